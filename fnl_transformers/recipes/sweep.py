"""The sweep behind the paper's Figure 4 (``recipes/iwslt14/sweep.sh``): every run of the official grid
(:mod:`fnl_transformers.recipes.figure4`) trained with ``recipes/iwslt14/train.sh``, evaluated on valid and test
with ``recipes/iwslt14/eval.sh``, and both panels drawn.

``python -m fnl_transformers.recipes.sweep [--dry-run] [--smoke] [--only LINES] [--scales S] [--seeds N]
[--gpus 0,1,... | --jobs N] [--out DIR] [--data DIR] [--max-update N] [-- extra train.sh arguments]``

* ``--dry-run`` prints the runs, their count and the GPU hours they need (measured per-update time from
  ``bench/results-gpu.json`` when it exists, else the official code's budget of 240 minutes per run, labelled).
* Filters: ``--only`` lines (``baseline``, ``wd``, ``fd-ov``, ``fd-qkov`` on top; ``wd``, ``wd+si``, ``fd``,
  ``fd+si`` at the bottom; a coefficient-0 run serves every line it is a point of), ``--scales`` (``0``: the
  dense top panel; ``0.25``, ``0.5``), ``--seeds``.
* Devices: ``--gpus 0,1,...`` runs one job per GPU at a time (``CUDA_VISIBLE_DEVICES`` per run); otherwise
  ``--jobs N`` runs N at a time on the CPU (default 1: one after another).
* Resumable: ``train.sh`` skips a finished run (``train.done``) and resumes a stopped one from
  ``checkpoint_last.pt``; a run whose valid and test results are newer than its checkpoint is not evaluated again.
* ``--smoke``: a mini grid (coefficients 0 and 1e-4, rank scale 0.5, seed 1: both panels' lines) on the synthetic
  corpus of ``prepare.sh --smoke``, a d-32 model for a few updates, generation capped at 1.2 x source + 10
  tokens: minutes on 2 CPU cores; it shows that every stage connects, not the paper's numbers.

Each run lives in ``OUT/SCALE/VARIANT[+si]/COEF/seedN`` with ``grid.json`` (its grid point) and ``sweep.log``.
At the end ``OUT/fig4_top.png``, ``OUT/fig4_bottom.png`` and ``OUT/fig4.md`` are (re)drawn from every finished
run; runs that failed are listed and make the exit code 2.
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

from . import figure4
from .figure4 import Run

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RECIPES = os.path.join(REPO, "recipes", "iwslt14")
RESULTS_GPU = os.path.join(REPO, "bench", "results-gpu.json")
SUBSETS = ("valid", "test")

SMOKE_COEFS = (0.0, 1e-4)
SMOKE_SCALES = (0.5,)
SMOKE_SEEDS = (1,)
SMOKE_UPDATES = 20
SMOKE_MODEL = [
    "--encoder-embed-dim",
    "32",
    "--decoder-embed-dim",
    "32",
    "--encoder-ffn-embed-dim",
    "64",
    "--decoder-ffn-embed-dim",
    "64",
]
SMOKE_EVAL = ["--beam", "2", "--", "--max-len-a", "1.2", "--max-len-b", "10"]
DEFAULT_UPDATES = 100_000  # train.sh's --max-update


class SweepError(ValueError):
    pass


def _user_dir() -> str:
    from ..userdir import user_dir_path

    return user_dir_path()


def _floats(text: str, what: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SweepError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _ints(text: str, what: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SweepError(f"{what} must be comma-separated integers, got {text!r}") from None


def plan(args) -> List[Run]:
    """The runs of the grid (official or smoke) that pass the filters."""
    if args.smoke:
        runs = figure4.grid(SMOKE_COEFS, SMOKE_COEFS, SMOKE_SCALES, SMOKE_SEEDS)
    else:
        runs = figure4.grid()
    only = None
    if args.only:
        only = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = sorted(set(only) - set(figure4.LINES))
        if unknown:
            raise SweepError(f"--only: unknown line(s) {unknown}; choose among {list(figure4.LINES)}")
    scales = _floats(args.scales, "--scales") if args.scales else None
    if scales is not None:
        known = {r.scale or 0.0 for r in runs}
        bad = sorted(set(scales) - known)
        if bad:
            raise SweepError(f"--scales: {bad} not in the grid; choose among {sorted(known)} (0: the dense model)")
    seeds = _ints(args.seeds, "--seeds") if args.seeds else None
    if seeds is not None:
        known_seeds = {r.seed for r in runs}
        if set(seeds) - known_seeds:
            raise SweepError(
                f"--seeds: {sorted(set(seeds) - known_seeds)} not in the grid; choose among {sorted(known_seeds)}"
            )
    out = figure4.select(runs, only, scales, seeds)
    if not out:
        raise SweepError("the filters leave no run; see --dry-run without filters for the grid")
    return out


def describe(runs: List[Run], args) -> str:
    configs = {r.config for r in runs}
    updates = args.max_update or (SMOKE_UPDATES if args.smoke else DEFAULT_UPDATES)
    hours, how = figure4.gpu_hours(runs, updates, None if args.smoke else RESULTS_GPU)
    top = [r for r in runs if r.panel == "top"]
    bottom = [r for r in runs if r.panel == "bottom"]
    lines = [
        f"Figure 4 grid ({'smoke' if args.smoke else 'the official make.py'}): {len(runs)} runs "
        f"({len(configs)} configurations x seeds {sorted({r.seed for r in runs})})",
        f"  top (dense): {len(top)} runs; bottom (rank scales "
        f"{', '.join(f'{s:g}' for s in sorted({r.scale for r in bottom}))}): {len(bottom)} runs",
        f"  estimated GPU hours: {hours:.1f} ({how})"
        if not args.smoke
        else f"  smoke: {updates} updates per run of a d-32 model on the synthetic corpus, CPU minutes",
    ]
    for r in runs:
        lines.append(f"  {r.name:<32} train.sh {' '.join(r.train_args())}   [{' '.join(r.lines())}]")
    return "\n".join(lines)


def _evaluated(folder: str) -> bool:
    ckpt = os.path.join(folder, "checkpoint_best.pt")
    results = [os.path.join(folder, f"checkpoint_best.{s}.results.json") for s in SUBSETS]
    return os.path.isfile(ckpt) and all(
        os.path.isfile(p) and os.path.getmtime(p) >= os.path.getmtime(ckpt) for p in results
    )


def run_one(run: Run, args, device: Optional[str], extra: Sequence[str]) -> Optional[str]:
    """Train and evaluate one run (``device``: a GPU id or ``None``); returns an error line or ``None``."""
    folder = os.path.join(args.out, run.name)
    figure4.write_grid_file(folder, run)
    env = dict(os.environ, FNL_USER_DIR=_user_dir())
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    train = ["bash", os.path.join(RECIPES, "train.sh"), *run.train_args(), "--data", args.data, "--save-dir", folder]
    if args.smoke:
        train += ["--smoke", "--max-update", str(args.max_update or SMOKE_UPDATES)]
    elif args.max_update:
        train += ["--max-update", str(args.max_update)]
    train_extra = list(extra) + (SMOKE_MODEL if args.smoke else [])
    if train_extra:
        train += ["--", *train_extra]
    evaluate = ["bash", os.path.join(RECIPES, "eval.sh"), folder, "--subset", ",".join(SUBSETS)]
    if args.smoke:
        evaluate += SMOKE_EVAL
    log = os.path.join(folder, "sweep.log")
    with open(log, "a") as f:
        for step, cmd in (("train", train), ("eval", evaluate)):
            if step == "eval" and _evaluated(folder):
                f.write("# eval: valid and test results newer than checkpoint_best.pt, kept\n")
                continue
            where = "" if device is None else f"CUDA_VISIBLE_DEVICES={device} "
            f.write(f"$ {where}{' '.join(cmd)}\n")
            f.flush()
            status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
            if status != 0:
                return f"{run.name}: {step} failed (exit {status}; log: {log})"
    return None


def execute(runs: List[Run], args, extra: Sequence[str]) -> List[str]:
    """All runs, ``len(devices)`` at a time; returns the error lines of the failed ones."""
    devices: "queue.Queue[Optional[str]]" = queue.Queue()
    slots = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else [None] * args.jobs
    for slot in slots:
        devices.put(slot)
    lock, done, errors = threading.Lock(), [0], []
    start = time.time()

    def work(run: Run) -> None:
        device = devices.get()
        try:
            error = run_one(run, args, device, extra)
        finally:
            devices.put(device)
        with lock:
            done[0] += 1
            where = f"GPU {device}" if device is not None else "CPU"
            status = "FAILED: " + error if error else "done"
            print(f"[{time.time() - start:6.0f}s] {done[0]}/{len(runs)} {run.name} ({where}): {status}", flush=True)
            if error:
                errors.append(error)

    with ThreadPoolExecutor(len(slots)) as pool:
        list(pool.map(work, runs))
    return errors


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="recipes/iwslt14/sweep.sh", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="print the runs, their count and GPU hours, and exit")
    p.add_argument("--smoke", action="store_true", help="the mini grid on the synthetic corpus (minutes on a CPU)")
    p.add_argument("--only", help=f"comma-separated lines among {', '.join(figure4.LINES)}")
    p.add_argument("--scales", help="comma-separated rank scales (0: the dense top panel; 0.25, 0.5)")
    p.add_argument("--seeds", help="comma-separated seeds (1, 2, 3)")
    p.add_argument("--gpus", help="comma-separated GPU ids: one run per GPU at a time")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time without --gpus (default 1; --smoke: 2)")
    p.add_argument("--out", help="output folder (default runs/fig4; --smoke: runs/fig4-smoke)")
    p.add_argument(
        "--data",
        help="prepared data (default: train.sh's; --smoke: prepared here with prepare.sh "
        "--smoke into data-bin/iwslt14-smoke.de-en)",
    )
    p.add_argument(
        "--max-update", type=int, help=f"updates per run (default {DEFAULT_UPDATES:,}; --smoke: {SMOKE_UPDATES})"
    )
    args = p.parse_args(argv)
    prog = os.environ.get("FNL_PROG", "sweep")
    try:
        if args.jobs is not None and args.jobs < 1:
            raise SweepError(f"--jobs must be a positive integer, got {args.jobs}")
        if args.gpus and args.jobs:
            raise SweepError("give --gpus (one run per GPU) or --jobs (CPU), not both")
        if args.max_update is not None and args.max_update < 1:
            raise SweepError(f"--max-update must be >= 1, got {args.max_update}")
        args.jobs = args.jobs or (2 if args.smoke else 1)
        runs = plan(args)
    except SweepError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(describe(runs, args), flush=True)
    if args.dry_run:
        return 0
    args.out = os.path.abspath(args.out or ("runs/fig4-smoke" if args.smoke else "runs/fig4"))
    if args.smoke:
        args.data = args.data or "data-bin/iwslt14-smoke.de-en"
        r = subprocess.run(
            ["bash", os.path.join(RECIPES, "prepare.sh"), "--smoke", "--out", args.data], capture_output=True, text=True
        )
        if r.returncode != 0:
            print(
                r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"{prog}: error: prepare.sh failed",
                file=sys.stderr,
            )
            return 2
    args.data = os.path.abspath(args.data or "data-bin/iwslt14.de-en")
    errors = execute(runs, args, extra)
    from .summary import find_results, load

    try:
        rows, _ = figure4.split_rows(load(find_results([args.out])))
        out = figure4.write(rows, args.out, expected=runs)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: no figure: {exc}", file=sys.stderr)
        return 2
    print(f"table: {out['table']}")
    for path in out["plots"]:
        print(f"plot:  {path}")
    if errors:
        print(f"{prog}: error: {len(errors)} run(s) failed: " + "; ".join(errors), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
