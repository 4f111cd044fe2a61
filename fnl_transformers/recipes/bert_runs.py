"""Sets of BERT runs in one process: the coefficient sweep (``recipes/bert/sweep.sh``) and the Table 4 grid
(``recipes/bert/table4.sh``).

* ``sweep``: the paper tuned the regularization coefficients on the uncompressed model against the
  unsupervised loss (Sec. 6). One phase-1 run (full head dim) per optimizer x coefficient x seed: weight decay
  for ``lamb`` (``--wd-grid``), the OV FD coefficient for ``lamb-fd`` and ``flambe`` (``--fd-grid``; weight decay
  elsewhere as given, default 0.01). Selection: the lowest held-out MLM loss (mean over seeds), never SQuAD.
  Writes ``OUT/selection.json`` and ``OUT/selection.md``.
* ``table4``: every optimizer x head dim (full, half) x seed: phase 1, phase 2, SQuAD v1.1 fine-tuning of the
  pretrained model, then the summary (``OUT/summary.md`` in the Table 4 layout, ``OUT/bert_mlm_curves.png``).
  Coefficients from a sweep's ``selection.json`` (``--selection``), else the pretraining defaults.

Both list their runs with ``--dry-run`` (the equivalent ``pretrain.sh`` / ``squad.sh`` commands, marked done or
to do), skip finished runs when started again (a finished run of another command in the same directory is an
error), and take further pretraining options after ``--``. ``--smoke``: tiny models and few updates on the
generated corpus (both objectives in ``table4``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from typing import Dict, List, Optional

from . import run_cli
from .bert_data import DataError
from .bert_pretrain import FD_DEFAULT, NVIDIA_LAMB, OBJECTIVES, OPTIMIZERS, RESULTS
from .squad import RecipeError

WD_GRID = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
FD_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
SQUAD_RESULTS = "squad.dev.results.json"
# --smoke: a 2-layer 64-wide BERT, a handful of updates per phase, a small held-out set
SMOKE_PRETRAIN = [
    "--smoke",
    "--hidden",
    "64",
    "--heads",
    "4",
    "--batch-size",
    "8",
    "--eval-tokens",
    "1024",
    "--curve-points",
    "3",
]
SMOKE_STEPS = {1: 12, 2: 6}
SMOKE_SQUAD = ["--smoke", "--epochs", "1", "--limit", "60", "--batch-size", "8"]
SMOKE_WD_GRID, SMOKE_FD_GRID = (0.0, 1e-2), (1e-2, 1e-1)


class Job:
    """One pretraining or SQuAD run: its directory, its command line and whether it has finished."""

    def __init__(self, kind: str, name: str, out: str, argv: List[str], model_dir: Optional[str] = None):
        self.kind, self.name, self.out, self.argv, self.model_dir = kind, name, os.path.abspath(out), argv, model_dir

    @property
    def results(self) -> str:
        return os.path.join(self.out, RESULTS if self.kind == "pretrain" else SQUAD_RESULTS)

    def command(self) -> str:
        script = "recipes/bert/pretrain.sh" if self.kind == "pretrain" else "recipes/bert/squad.sh"
        return shlex.join([script] + self.argv)

    def parse(self):
        from . import bert_pretrain, squad

        return (bert_pretrain if self.kind == "pretrain" else squad).build_parser().parse_args(self.argv)

    def done(self) -> bool:
        """Finished with this command line; a finished run of another command here is an error."""
        if not os.path.isfile(self.results):
            return False
        with open(self.results) as f:
            got = json.load(f)
        if self.kind == "pretrain":
            want = vars(self.parse())
            diff = sorted(k for k in set(want) | set(got.get("args", {})) if want.get(k) != got.get("args", {}).get(k))
        else:
            diff = [] if got.get("model_dir") == os.path.abspath(self.model_dir or "") else ["--model"]
        if diff:
            raise RecipeError(
                f"{self.out} holds a finished run of another command (it differs in {', '.join(diff)}): "
                "use another --out or remove that directory"
            )
        return True

    def run(self) -> dict:
        from . import bert_pretrain, squad

        return (bert_pretrain if self.kind == "pretrain" else squad).run(self.parse())


def _floats(text: str, flag: str) -> List[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise RecipeError(f"{flag} needs numbers >= 0, got {text!r}")
    return values


def _choices(text: str, allowed, flag: str) -> List[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise RecipeError(f"{flag} takes a comma-separated list of {', '.join(allowed)}, got {text!r}")
    return values


def _seeds(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"--seeds takes comma-separated integers, got {text!r}") from None


def _execute(jobs: List[Job], dry_run: bool) -> None:
    status = [(j, j.done()) for j in jobs]
    todo = sum(not d for _, d in status)
    print(f"{len(jobs)} runs, {len(jobs) - todo} finished, {todo} to run")
    for j, d in status:
        print(f"[{'done' if d else 'todo'}] {j.name}: {j.command()}")
    if dry_run:
        return
    import gc

    from transformers import Trainer  # noqa: F401  (imported before the freeze below)

    gc.freeze()  # the libraries' objects live on: Trainer's gc.collect() after each run then skips them
    for i, (j, d) in enumerate(status):
        if not d:
            print(f"=== {j.name} ({i + 1}/{len(jobs)})", flush=True)
            j.run()


# ------------------------------------------------------------------------------------------------ sweep
def sweep_jobs(args) -> List[Job]:
    smoke = args.smoke
    wd_grid = _floats(args.wd_grid, "--wd-grid") if args.wd_grid else list(SMOKE_WD_GRID if smoke else WD_GRID)
    fd_grid = _floats(args.fd_grid, "--fd-grid") if args.fd_grid else list(SMOKE_FD_GRID if smoke else FD_GRID)
    if 0.0 in fd_grid:
        raise RecipeError("--fd-grid: FD 0 is lamb with weight decay (in --wd-grid); give coefficients > 0")
    extra = (SMOKE_PRETRAIN + ["--max-steps", str(SMOKE_STEPS[1])] if smoke else []) + args.extra
    jobs = []
    for opt in _choices(args.optimizers, OPTIMIZERS, "--optimizers"):
        flag, grid = ("--weight-decay", wd_grid) if opt == "lamb" else ("--fd-ov", fd_grid)
        for coef in grid:
            for seed in _seeds(args.seeds):
                name = f"{opt}-c{coef:g}-s{seed}"
                jobs.append(
                    Job(
                        "pretrain",
                        name,
                        os.path.join(args.out, name),
                        [
                            opt,
                            "--head-dim",
                            "full",
                            "--objective",
                            args.objective,
                            "--seed",
                            str(seed),
                            flag,
                            f"{coef:g}",
                        ]
                        + extra
                        + ["--out", os.path.join(args.out, name)],
                    )
                )
    return jobs


def select(jobs: List[Job], out: str) -> dict:
    """Per optimizer, the coefficient with the lowest mean held-out MLM loss over the finished seeds."""
    by: Dict[str, Dict[float, List[dict]]] = {}
    missing = []
    for j in jobs:
        if not os.path.isfile(j.results):
            missing.append(j.name)
            continue
        with open(j.results) as f:
            r = json.load(f)
        by.setdefault(r["optimizer"], {}).setdefault(r["coef"], []).append(r)
    sel = {
        "metric": "held-out MLM loss (lower is better), mean over seeds",
        "complete": not missing,
        "missing": missing,
        "optimizers": {},
    }
    lines = [
        "| optimizer | coefficient | "
        + " | ".join(["held-out MLM loss (mean over seeds)", "seeds", "selected"])
        + " |",
        "|---|---|---:|---:|---|",
    ]
    for opt in OPTIMIZERS:
        if opt not in by:
            continue
        grid = {c: statistics.fmean(r["mlm_loss"] for r in rs) for c, rs in sorted(by[opt].items())}
        best = min(grid, key=lambda c: (grid[c], c))
        first = by[opt][best][0]
        sel["optimizers"][opt] = {
            "coef": best,
            "flag": "--weight-decay" if opt == "lamb" else "--fd-ov",
            "mlm_loss": round(grid[best], 4),
            "weight_decay": first["weight_decay"],
            "grid": {f"{c:g}": {"mlm_loss": round(v, 4), "seeds": len(by[opt][c])} for c, v in grid.items()},
        }
        for c, v in grid.items():
            kind = f"wd {c:g}" if opt == "lamb" else f"FD {c:g} (wd {by[opt][c][0]['weight_decay']:g})"
            lines.append(f"| {opt} | {kind} | {v:.4f} | {len(by[opt][c])} | {'**selected**' if c == best else ''} |")
    if missing:
        lines += ["", f"Not finished (not counted): {', '.join(missing)}."]
    os.makedirs(out, exist_ok=True)
    for name, text in (
        ("selection.json", json.dumps(sel, indent=2, sort_keys=True)),
        ("selection.md", "\n".join(lines)),
    ):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)
    print("\n".join(lines))
    print(f"selection: {os.path.join(out, 'selection.json')}")
    return sel


def sweep(args) -> dict:
    jobs = sweep_jobs(args)
    _execute(jobs, args.dry_run)
    return {} if args.dry_run else select(jobs, args.out)


# ------------------------------------------------------------------------------------------------ table4
def _coefficients(args) -> Dict[str, List[str]]:
    """Per optimizer, the coefficient options of its pretraining runs."""
    if not args.selection:
        print(
            f"note: coefficients not tuned (weight decay {NVIDIA_LAMB['weight_decay']}, FD {FD_DEFAULT} unless given "
            "after --): pass --selection SWEEP_OUT/selection.json from recipes/bert/sweep.sh",
            file=sys.stderr,
        )
        return {opt: [] for opt in OPTIMIZERS}
    try:
        with open(args.selection) as f:
            sel = json.load(f)["optimizers"]
    except (OSError, ValueError, KeyError) as e:
        raise RecipeError(
            f"--selection {args.selection}: not a selection.json of recipes/bert/sweep.sh ({e})"
        ) from None
    out = {}
    for opt in OPTIMIZERS:
        if opt in sel:
            s = sel[opt]
            out[opt] = (
                ["--weight-decay", f"{s['coef']:g}"]
                if opt == "lamb"
                else ["--fd-ov", f"{s['coef']:g}", "--weight-decay", f"{s['weight_decay']:g}"]
            )
    return out


def table4_jobs(args) -> List[Job]:
    smoke = args.smoke
    objectives = _choices(args.objectives or ("mlm-nsp,mlm" if smoke else "mlm-nsp"), OBJECTIVES, "--objectives")
    heads = [h.strip() for h in args.head_dims.split(",") if h.strip()]
    coefs = _coefficients(args)
    squad_data = (
        SMOKE_SQUAD
        if smoke
        else (
            ["--train", args.squad_train, "--dev", args.squad_dev]
            if args.squad_train
            else ["--dataset", args.squad_dataset]
            if args.squad_dataset
            else []
        )
    )
    if not args.no_squad and not squad_data:
        raise RecipeError(
            "give SQuAD v1.1 data: --squad-train FILE --squad-dev FILE, --squad-dataset squad (online), or --no-squad"
        )
    jobs = []
    for seed in _seeds(args.seeds):
        for objective in objectives:
            for opt in _choices(args.optimizers, OPTIMIZERS, "--optimizers"):
                if opt not in coefs:
                    raise RecipeError(
                        f"--selection {args.selection} has no {opt}: sweep it or drop it from --optimizers"
                    )
                for head in heads:
                    name = f"{opt}-{head}-{objective}-s{seed}"
                    base = os.path.join(args.out, name)
                    common = [opt, "--objective", objective, "--seed", str(seed)] + coefs[opt]
                    phases = [1, 2][: args.phases]
                    for phase in phases:
                        extra = (
                            SMOKE_PRETRAIN + ["--max-steps", str(SMOKE_STEPS[phase])] if smoke else []
                        ) + args.extra
                        argv = common + (
                            ["--head-dim", head]
                            if phase == 1
                            else ["--phase", "2", "--resume", os.path.join(base, "phase1")]
                        )
                        jobs.append(
                            Job(
                                "pretrain",
                                f"{name} phase {phase}",
                                os.path.join(base, f"phase{phase}"),
                                argv + extra + ["--out", os.path.join(base, f"phase{phase}")],
                            )
                        )
                    if not args.no_squad:
                        model = os.path.join(os.path.abspath(base), f"phase{phases[-1]}", "model")
                        jobs.append(
                            Job(
                                "squad",
                                f"{name} SQuAD",
                                os.path.join(base, "squad"),
                                ["--model", model] + squad_data + ["--out", os.path.join(base, "squad")],
                                model_dir=model,
                            )
                        )
    return jobs


def table4(args) -> dict:
    from .summary import summarize

    if args.phases not in (1, 2):
        raise RecipeError(f"--phases is 1 (phase 1 only) or 2 (both), got {args.phases}")
    jobs = table4_jobs(args)
    _execute(jobs, args.dry_run)
    if args.dry_run:
        return {}
    out = summarize([args.out], args.out)
    print(out["markdown"])
    print(f"table: {out['table']}")
    for path in out["plots"]:
        print(f"plot:  {path}")
    return out


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=os.environ.get("FNL_PROG", "python -m fnl_transformers.recipes.bert_runs"),
        description=__doc__.splitlines()[0],
    )
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("sweep", prog="recipes/bert/sweep.sh", help="coefficient sweep, selection by held-out MLM loss")
    a.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    a.add_argument("--wd-grid", help=f"weight decays for lamb (default {','.join(f'{c:g}' for c in WD_GRID)})")
    a.add_argument(
        "--fd-grid", help=f"OV FD coefficients for lamb-fd and flambe (default {','.join(f'{c:g}' for c in FD_GRID)})"
    )
    a.add_argument("--objective", choices=OBJECTIVES, default="mlm-nsp")
    a.add_argument("--out", default="runs/bert-sweep")
    b = sub.add_parser(
        "table4",
        prog="recipes/bert/table4.sh",
        help="every optimizer x head dim: phase 1, phase 2, SQuAD, the Table 4 summary",
    )
    b.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    b.add_argument("--head-dims", default="full,half", help="comma-separated: full, half or integers")
    b.add_argument("--objectives", help="comma-separated among mlm-nsp, mlm (default mlm-nsp; smoke: both)")
    b.add_argument("--phases", type=int, default=2, help="2 (default): phase 1 then phase 2; 1: phase 1 only")
    b.add_argument("--selection", help="a selection.json of recipes/bert/sweep.sh (the tuned coefficients)")
    b.add_argument("--squad-train", help="SQuAD v1.1 train JSON (with --squad-dev)")
    b.add_argument("--squad-dev")
    b.add_argument("--squad-dataset", help="HuggingFace SQuAD dataset name (online), e.g. squad")
    b.add_argument("--no-squad", action="store_true", help="pretraining only")
    b.add_argument("--out", default="runs/bert-table4")
    for q in (a, b):
        q.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
        q.add_argument("--dry-run", action="store_true", help="list the runs (done / to do) and stop")
        q.add_argument("--smoke", action="store_true", help="tiny models, few updates, generated data")
        q.add_argument("extra", nargs="*", help="after --: options for every pretraining run (e.g. --corpus FILES)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke and args.out in ("runs/bert-sweep", "runs/bert-table4"):
        args.out += "-smoke"
    return run_cli(
        sweep if args.what == "sweep" else table4, args, args.what, (RecipeError, DataError, FileNotFoundError)
    )


if __name__ == "__main__":
    sys.exit(main())
