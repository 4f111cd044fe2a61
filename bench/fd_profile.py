"""Profile (``torch.profiler``, CPU, one thread) of the Frobenius-decay work of one training update of
``fnl_transformer_iwslt_de_en`` with FD on every QK and OV form, for this checkout and optionally an older one
measured in the same process, alternating with it (the same machine load for both):

* coupled: the penalty and its backward (what ``fd_label_smoothed_cross_entropy`` adds to a step);
* decoupled: the FD term of the optimizer group's forms (what FLAMBe and AdamWFD add to a step).

Per operator: calls and self CPU time per update; per version: median CPU time per update without the profiler.
The README's before/after table::

    git archive <old commit> | tar -x -C /tmp/fnl_old       # any older checkout
    python -m bench.fd_profile --before /tmp/fnl_old --out bench/profile.json --readme README.md

The older version is loaded from ``<path>/fnl_transformers/core`` under another name and called through its
public functions (``frobenius_penalty``, ``accumulate_fd_grads``) on the same model and forms (keyed by
number, as an optimizer group keys them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict

import torch

START, END = "<!-- profile:start -->", "<!-- profile:end -->"
STEPS, ROUNDS = 3, 7


def load_core(checkout: str, name: str = "fnl_before_core"):
    """``<checkout>/fnl_transformers/core`` imported as the package ``name`` (the core imports only itself)."""
    path = os.path.join(checkout, "fnl_transformers", "core")
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(path, "__init__.py"), submodule_search_locations=[path]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def ops_table(prof, steps: int) -> Dict[str, dict]:
    ops = {}
    for e in prof.key_averages():
        if e.key.startswith("aten::") or "Backward" in e.key:
            ops[e.key] = dict(calls=e.count / steps, self_ms=e.self_cpu_time_total / 1e3 / steps)
    return ops


def measure(fns: Dict[str, Callable[[], object]]) -> Dict[str, dict]:
    """Per version: median CPU ms per update over alternating rounds, then a profile of ``STEPS`` updates."""
    from torch.profiler import ProfilerActivity, profile

    for fn in fns.values():
        fn()  # warm-up: plans, first allocations
    times = {k: [] for k in fns}
    for _ in range(ROUNDS):
        for k, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[k].append(time.process_time() - t0)
    out = {}
    for k, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(STEPS):
                fn()
        out[k] = dict(ms_per_update=1e3 * statistics.median(times[k]), ops=ops_table(prof, STEPS))
    return out


def run(before: str = None, quick: bool = False) -> Dict:
    from bench.fairseq_common import ARCH, QUICK_DIMS, Run, make_data, train_argv
    from fnl_transformers import core as after_core

    cores = {"after": after_core}
    if before:
        cores = {"before": load_core(before), "after": after_core}
    with tempfile.TemporaryDirectory(prefix="fnl_profile_") as root:
        data = make_data(root, 96 if quick else 600, mean_len=10 if quick else 24, vocab=300 if quick else 8000)
        model = Run(train_argv(data, root + "/ck", ARCH, *(QUICK_DIMS if quick else []))).model
    params = list(model.parameters())
    # the forms as an optimizer group holds them: specs keyed by a number, a lookup from number to parameter
    table, specs = [], []
    for _, module, spec, _ in after_core.iter_forms(model, ("qk", "ov")):
        get = after_core.module_lookup(module)
        for key in spec.keys():
            table.append(get(key))
        specs.append(spec.with_keys(lambda key, get=get: next(i for i, t in enumerate(table) if t is get(key))))
    coeffs = dict(qk=1e-4, ov=1e-4)

    def coupled(core):
        def fn():
            for p in params:
                p.grad = None
            core.frobenius_penalty(model, qk=1e-4, ov=1e-4).backward()

        return fn

    def decoupled(core):
        @torch.no_grad()
        def fn():
            core.accumulate_fd_grads(specs, table.__getitem__, coeffs, {})

        return fn

    return dict(
        model=f"{ARCH}{' (quick dims)' if quick else ''} with FD on every QK and OV form",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        before=before,
        coupled=measure({k: coupled(c) for k, c in cores.items()}),
        decoupled=measure({k: decoupled(c) for k, c in cores.items()}),
    )


def table(result: Dict, top: int = 8) -> str:
    labels = list(result["coupled"])
    lines = [
        f"FD work per update of {result['model']}: `python -m bench.fd_profile` (torch.profiler, CPU, "
        f"{result['threads']} thread; versions alternating in one process). Operators by self time, calls and "
        "self ms per update under the profiler; last row: median ms per update without it.",
        "",
    ]
    for mode, what in (("coupled", "penalty + backward, in the loss"), ("decoupled", "an optimizer group's FD term")):
        r = result[mode]
        head = " | ".join(f"{lab}: calls | {lab}: ms" for lab in labels)
        lines += [f"**{mode}** ({what})", "", f"| operator | {head} |", "|---" * (1 + 2 * len(labels)) + "|"]
        names = []
        for lab in labels:
            ranked = sorted(r[lab]["ops"].items(), key=lambda kv: -kv[1]["self_ms"])
            names += [n for n, _ in ranked[:top] if n not in names]
        for n in names:
            cells = []
            for lab in labels:
                o = r[lab]["ops"].get(n)
                cells += ["-", "-"] if o is None else [f"{o['calls']:.0f}", f"{o['self_ms']:.1f}"]
            lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
        cells = []
        for lab in labels:
            calls = sum(o["calls"] for k, o in r[lab]["ops"].items() if k.startswith("aten::"))
            cells += [f"{calls:.0f} aten calls", f"**{r[lab]['ms_per_update']:.1f}**"]
        lines += ["| all operators; time without the profiler | " + " | ".join(cells) + " |", ""]
    return "\n".join(lines)


def update_readme(path: str, text: str) -> bool:
    with open(path) as f:
        content = f.read()
    if START not in content or END not in content:
        return False
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{START}\n{text}{END}{tail}")
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fd_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", help="an older checkout to profile alongside (its fnl_transformers/core)")
    p.add_argument("--out", help="write the result (JSON) here")
    p.add_argument("--readme", help="write the table between the profile markers of this file")
    p.add_argument("--from-json", help="make the table from this earlier result instead of profiling")
    p.add_argument("--quick", action="store_true", help="tiny model (a smoke test; numbers meaningless)")
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        torch.set_num_threads(1)
        result = run(args.before, args.quick)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    text = table(result)
    print(text)
    if args.readme and not update_readme(args.readme, text + "\n"):
        print(f"{args.readme} has no {START} / {END} markers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
