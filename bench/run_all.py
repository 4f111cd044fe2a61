"""``python -m bench.run_all`` (``make bench``): run every bench script, write ``results.json`` and ``results.md``.

Each question is its own script (``python -m bench.<name>``), run here in a fresh subprocess so that threads,
memory and fairseq's registries do not leak from one to the next; a script that fails or cannot run on this
machine becomes a row that says so. The markdown table lists, per comparison, the baseline and our median
times, the ratio (its definition in the row), the target and whether it was met.

By default every script runs single-threaded and two scripts run at a time (``--threads 1 --jobs 2``): on a
2-core machine shared with other work, multi-threaded MKL/LAPACK calls waited on each other's threads (an SVD
took 14x longer with 2 threads than with 1), which distorts ratios; a baseline and its contender always run in
the same process, alternating, so a neighbour slows both alike.

Options: ``--quick`` (tiny sizes: a smoke test, numbers meaningless; writes ``results-quick.*``), ``--only
1,4,5`` (items by number), ``--threads N`` (torch threads per script, default 1), ``--jobs N`` (scripts at a
time, default 2), ``--out DIR`` (default ``bench/``),
``--readme PATH``: replace the text between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in PATH with the
table (default: ``README.md`` when it has the markers, full runs only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import torch

from .common import fmt_s, machine

SCRIPTS = [
    (1, "fd_cost"),
    (2, "fd_overhead"),
    (3, "lowrank_throughput"),
    (4, "si_cost"),
    (5, "optimizer_step"),
    (6, "deployment"),
    (7, "fsdp_comm"),
]
LONGEST_FIRST = [2, 3, 6, 5, 1, 4, 7]  # start order when scripts run side by side (--jobs)
TIMEOUTS = {2: 10800}  # seconds per script where the default (900) is too short: item 2 trains 8 model pairs, 3 times
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def script_env() -> dict:
    """OpenMP threads sleep instead of spinning while they wait (unless the caller chose otherwise): on a
    machine shared with other jobs, spinning threads made an SVD 7x slower here, and it would distort ratios."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_script(item: int, name: str, quick: bool, threads: Optional[int], out_dir: str, timeout: float) -> dict:
    path = os.path.join(out_dir, f".item{item}.json")
    cmd = [sys.executable, "-m", f"bench.{name}", "--json", path] + (["--quick"] if quick else [])
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=script_env())
        log = (res.stdout + res.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        log = f"timed out after {timeout:.0f} s"
    result = None
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
        os.remove(path)
    if result is None:
        result = dict(item=item, question=name, quick=quick, rows=[], error=f"script produced no result: {log}")
    result["script"] = f"bench/{name}.py"
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def _ratio(r: dict) -> str:
    if r.get("ratio") is None:
        return "-"
    if r.get("repeats"):  # median of independent repeats, their range
        lo, hi = r["spread"]
        return f"{r['ratio']:.3f} [{lo:.3f}-{hi:.3f}, {len(r['repeats'])} repeats] ({r['ratio_def']})"
    return f"{r['ratio']:.2f} ({r['ratio_def']})"


def _cell(r: dict, who: str) -> str:
    """``label: time``, or the label alone for a row that compares no times (e.g. bytes, in the label)."""
    if not r.get(who):
        return "-"
    return r[who] if r.get(who + "_s") is None else f"{r[who]}: {fmt_s(r[who + '_s'])}"


def _met(r: dict, quick: bool) -> str:
    if r["status"] != "ok":
        return r["status"]
    if quick and r["met"] is not None:
        return "n/a (quick)"
    return {True: "yes", False: "**no**", None: "-"}[r["met"]]


def clocks(results: dict) -> str:
    names = sorted({it.get("clock") for it in results["items"] if it.get("clock")})
    return " / ".join(names) if names else "wall time"


def markdown(results: dict) -> str:
    lines = [
        f"Benchmarks ({'QUICK smoke run: tiny sizes, numbers meaningless' if results['quick'] else 'full run'}), "
        f"{results['date']}, on {results['machine']}, OMP_WAIT_POLICY={results.get('omp_wait_policy')}, "
        f"{results.get('jobs', 1)} script(s) at a time; "
        f"load average (1/5/15 min) at start {results['load_start']}, "
        f"total {results['total_seconds']:.0f} s (wall). Times are medians over repeats of "
        f"{clocks(results)}; every ratio is against a "
        "baseline measured in the same process, alternating with it. Generated by `make bench` "
        "(`python -m bench.run_all`) from `bench/results.json`.",
        "",
        "| # | Question | Case | Baseline | Ours | Ratio | Target | Met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for item in results["items"]:
        q = item["question"]
        if item.get("error"):
            first = item["error"].strip().splitlines()[0] if item["error"].strip() else "error"
            lines.append(f"| {item['item']} | {q} | - | - | - | - | - | error: {first[:200]} |")
        for r in item["rows"]:
            base = _cell(r, "baseline")
            ours = _cell(r, "ours")
            cells = [str(item["item"]), q, r["case"], base, ours, _ratio(r), r["target"], _met(r, results["quick"])]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def update_readme(path: str, table: str) -> bool:
    with open(path) as f:
        text = f.read()
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{START}\n{table}{END}{tail}")
    return True


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke test; numbers meaningless)")
    p.add_argument("--only", help="comma list of item numbers to run (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each script (default 1)")
    p.add_argument(
        "--jobs", type=int, default=1, help="scripts run at a time (default 1: least interference between timings)"
    )
    p.add_argument("--out", default=os.path.join(ROOT, "bench"), help="folder for results.json / results.md")
    p.add_argument(
        "--readme",
        help="file whose bench:start/bench:end section gets the table "
        "(default: README.md if it has the markers; never in --quick runs)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per script before it is stopped (default 900; item 2: 10800)",
    )
    args = p.parse_args(argv)
    items = SCRIPTS
    if args.only:
        try:
            wanted = {int(x) for x in args.only.split(",") if x.strip()}
        except ValueError:
            p.error(f"--only takes item numbers such as 1,4,5; got {args.only!r}")
        unknown = wanted - {i for i, _ in SCRIPTS}
        if unknown:
            p.error(f"--only: no item {sorted(unknown)}; items are {[i for i, _ in SCRIPTS]}")
        items = [(i, n) for i, n in SCRIPTS if i in wanted]
    os.makedirs(args.out, exist_ok=True)
    load_start = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    torch.set_num_threads(args.threads)  # so that machine() reports the threads the scripts use
    results = dict(
        machine=machine(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        quick=args.quick,
        threads=args.threads,
        jobs=args.jobs,
        omp_wait_policy=script_env()["OMP_WAIT_POLICY"],
        load_start=load_start,
        items=[],
    )

    def one(item_name):
        item, name = item_name
        print(f"[bench] item {item}: bench/{name}.py ...", flush=True)
        timeout = args.timeout or TIMEOUTS.get(item, 900)
        res = run_script(item, name, args.quick, args.threads, args.out, timeout)
        status = "error" if res.get("error") else f"{len(res['rows'])} rows"
        print(f"[bench] item {item}: {status} in {res['wall_seconds']:.0f} s", flush=True)
        return res

    order = sorted(items, key=lambda x: LONGEST_FIRST.index(x[0]))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = list(pool.map(one, order))
    results["items"] = sorted(done, key=lambda r: r["item"])
    results["total_seconds"] = time.perf_counter() - t0
    results["load_end"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    stem = "results-quick" if args.quick else "results"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    table = markdown(results)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(table)
    print(table)
    readme = args.readme or os.path.join(ROOT, "README.md")
    if not args.quick and os.path.exists(readme) and update_readme(readme, table):
        print(f"[bench] table written into {readme}")
    return 1 if any(r.get("error") for r in results["items"]) else 0


if __name__ == "__main__":
    sys.exit(main())
