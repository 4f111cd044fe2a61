"""Timing, result rows and the command line shared by the bench scripts.

A script defines ``run(quick: bool) -> list of rows`` and ends with ``main(ITEM, QUESTION, run)``; run as
``python -m bench.<script> [--quick] [--json PATH]``. A row is a dict (see :func:`row`); a question that cannot
run on this machine returns :func:`skipped` rows, never made-up numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import torch


def clock() -> Tuple[Callable[[], float], str]:
    """The process's CPU time when torch runs single-threaded (then it is the compute time, and time spent
    waiting for a core on a shared machine does not count), else wall time."""
    if torch.get_num_threads() == 1:
        return time.process_time, "process CPU time (single-threaded)"
    return time.perf_counter, "wall time"


def median_times(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, float]:
    """Median time (s, see :func:`clock`) of each function; the functions alternate within each repeat, so
    drift on a shared machine hits all of them alike. ``warmup`` untimed rounds first."""
    now = clock()[0]
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            gc.collect()
            t0 = now()
            fn()
            dt = now() - t0
            if r >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def paired_ratios(baseline: Callable[[], object], ours: Callable[[], object], rounds: int, warmup: int = 1):
    """``rounds`` rounds of baseline then ours (after ``warmup`` untimed rounds); returns the per-round ratios
    ``ours / baseline`` (each from two adjacent measurements, so slow drift of a shared machine cancels) and
    the median times ``(baseline_s, ours_s)``."""
    now = clock()[0]
    tb, to = [], []
    for r in range(warmup + rounds):
        times = []
        for fn in (baseline, ours):
            gc.collect()
            t0 = now()
            fn()
            times.append(now() - t0)
        if r >= warmup:
            tb.append(times[0])
            to.append(times[1])
    return [o / b for b, o in zip(tb, to)], (statistics.median(tb), statistics.median(to))


def repeats_summary(ratios: List[float], higher_is_better: bool, limit: Optional[float]) -> dict:
    """Median, spread and worst of independent repeats of one ratio; ``met`` only when the *worst* repeat
    meets ``limit`` (a lower bound for speed-ups, an upper bound for slowdowns), None without a limit."""
    worst = min(ratios) if higher_is_better else max(ratios)
    met = None if limit is None else (worst >= limit if higher_is_better else worst <= limit)
    return dict(
        ratio=statistics.median(ratios), repeats=list(ratios), spread=[min(ratios), max(ratios)], worst=worst, met=met
    )


def repeated(
    make: Callable[[], Dict[str, Callable[[], object]]],
    repeats: int,
    rounds: int,
    warmup: int = 1,
    teardown: Optional[Callable[[], None]] = None,
) -> List[Dict[str, float]]:
    """``repeats`` independent measurements: each builds fresh callables with ``make()`` (new models, new
    optimizers: new memory), runs ``warmup`` untimed rounds, then :func:`median_times` over ``rounds``
    alternating rounds. Returns one ``{name: median seconds}`` per repeat."""
    out = []
    for _ in range(repeats):
        fns = make()
        out.append(median_times(fns, rounds, warmup=warmup))
        del fns
        if teardown is not None:
            teardown()
        gc.collect()
    return out


def row(
    case: str,
    baseline: str,
    baseline_s: Optional[float],
    ours: str,
    ours_s: Optional[float],
    ratio: Optional[float],
    ratio_def: str,
    target: str,
    met: Optional[bool],
    **extra,
) -> dict:
    """One measured comparison. ``ratio_def`` says how ``ratio`` is formed (e.g. "baseline / ours")."""
    return dict(
        case=case,
        baseline=baseline,
        baseline_s=baseline_s,
        ours=ours,
        ours_s=ours_s,
        ratio=ratio,
        ratio_def=ratio_def,
        target=target,
        met=met,
        status="ok",
        **extra,
    )


def skipped(case: str, target: str, reason: str) -> dict:
    return dict(
        case=case,
        baseline=None,
        baseline_s=None,
        ours=None,
        ours_s=None,
        ratio=None,
        ratio_def="",
        target=target,
        met=None,
        status=f"skipped: {reason}",
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def main(item: int, question: str, run: Callable[[bool], List[dict]]) -> None:
    parser = argparse.ArgumentParser(description=f"bench item {item}: {question}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a smoke test; no claims)")
    parser.add_argument("--json", help="write the result here instead of printing it")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        rows = run(args.quick)
        error = None
    except Exception as e:  # reported as an error row by run_all, with the traceback
        rows, error = [], f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    out = dict(
        item=item,
        question=question,
        quick=args.quick,
        threads=torch.get_num_threads(),
        clock=clock()[1],
        seconds=time.perf_counter() - t0,
        rows=rows,
        error=error,
    )
    text = json.dumps(out, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)
    sys.exit(1 if error else 0)


def fmt_s(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def check_close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ``||a - b|| / ||b||`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def bert_config(quick: bool):
    from transformers import BertConfig

    if quick:
        return BertConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
        )
    return BertConfig()  # BERT-base: 12 layers, 768 wide, 12 heads of 64, FFN 3072, vocab 30522


def bert_model(quick: bool, seed: int = 0):
    """A randomly initialized BertModel with QK/OV forms registered on every self-attention layer."""
    from transformers import BertModel

    from fnl_transformers.core import attention_form_specs, register_attention_forms

    torch.manual_seed(seed)
    config = bert_config(quick)
    t0 = time.perf_counter()
    model = BertModel(config, add_pooling_layer=False)
    model.fnl_build_seconds = time.perf_counter() - t0  # random initialization time, for item 4
    for layer in model.encoder.layer:
        register_attention_forms(
            layer.attention,
            attention_form_specs(
                "self.query.weight",
                "self.key.weight",
                "self.value.weight",
                "output.dense.weight",
                config.num_attention_heads,
            ),
        )
    return model


def attention_weights(layer) -> Tuple[torch.Tensor, ...]:
    att = layer.attention
    return (att.self.query.weight, att.self.key.weight, att.self.value.weight, att.output.dense.weight)
