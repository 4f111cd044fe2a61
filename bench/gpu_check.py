"""``make gpu-check`` (``python3 -m bench.gpu_check``): the GPU check, one prepared command for a machine with one
CUDA GPU, torch and no network. Well under 10 minutes on a current GPU (a time budget, ``--budget-s``, cuts
the training stage short rather than overrun). Stages, each timed, each recorded even when a later one fails:

1. **setup**: install what the machine lacks from ``.gpu-carry/`` (``make gpu-carry`` fills it elsewhere):
   carried wheels into ``WORK/site``; the fairseq sdist unpacked into ``WORK/fairseq-src`` with its three
   Cython/C++ extensions built in place; small ``fairseq-*`` / ``fnl`` launchers in ``WORK/bin``; all put on
   ``PYTHONPATH`` / ``PATH`` for this process and its children. Nothing is installed into the system.
2. **tests**: ``pytest -m gpu`` (the CUDA tests of ``tests/test_gpu.py``); counts and skip reasons recorded.
3. **timings** at the paper's batch (``--max-tokens 4000`` target tokens) for the paper's IWSLT model shape (2 + 2
   layers, d 256, FFN 1024, 4 heads of 64, pre-norm; ``--arch``/``--model-flags`` change it): one fairseq
   training step, median wall time (CUDA synchronized) over alternating repeats, of the dense model without
   FD, with coupled FD on every QK and OV form, and with FFN + embeddings factorized at rank scales 0.5 and
   0.25; float32 and ``--fp16``. Gives the FD overhead and the dense-vs-factorized tokens/s.
4. **training**: ``recipes/iwslt14/prepare.sh --smoke``, then the recipe's own ``fairseq-train`` command
   (``recipes/iwslt14/train.sh VARIANT --dry-run``) for ``--updates`` updates per variant, validation and
   checkpoints off; seconds per update from fairseq's own log (``wall`` between the first and the last
   ``train_inner`` record), and the GPU hours of the recipe's 100k-update run.

Writes ``bench/results-gpu.json`` (fields: README, "Training on GPUs") and regenerates the README's GPU table and
the GPU hours in ``recipes/README.md`` from it (``bench.gpu_report``). ``--cpu-smoke`` runs the same pipeline
on the CPU with tiny sizes (a minute) and writes ``bench/results-gpu-smoke.json``, touching no README.
Exit code 0 when every stage ran and no test failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results-gpu.json")
SMOKE_RESULTS = os.path.join(ROOT, "bench", "results-gpu-smoke.json")
CARRY = os.path.join(ROOT, ".gpu-carry")
MIN_TRANSFORMERS = (5, 19)
SCHEMA = 1

# the paper's IWSLT'14 model (transformer_small: 2 + 2 layers, d 256, FFN 1024, 4 heads of 64, pre-norm); its
# architecture defaults are the model, so no flags
ARCH = "fnl_transformer_small"
MODEL_FLAGS = ""
SMOKE_MODEL_FLAGS = (
    "--encoder-embed-dim 32 --decoder-embed-dim 32 --encoder-ffn-embed-dim 64 "
    "--decoder-ffn-embed-dim 64 --encoder-layers 1 --decoder-layers 1 --encoder-attention-heads 4 "
    "--decoder-attention-heads 4 --encoder-normalize-before --decoder-normalize-before"
)
FD_FLAGS = ["--fd-qk", "1e-4", "--fd-ov", "1e-4"]
FP16_FLAGS = ["--fp16", "--fp16-no-flatten-grads"]
# training variants VARIANT[:PRECISION]: the fairseq-train flags of each precision (bf16: the plugin trains it on the
# GPU where torch_xla is missing, see fnl_transformers.fairseq_plugin.precision)
PRECISION_FLAGS = {"fp32": [], "fp16": FP16_FLAGS, "bf16": ["--bf16"], "amp": ["--amp"]}
RECIPE_MAX_UPDATE = 100_000  # recipes/iwslt14/train.sh, the paper's setting
DEFAULT_VARIANTS = "baseline,fd-qkov,fd-qkov:fp16"
# on a CPU fairseq's fp16 overflow handling fails (it builds a CUDA tensor), so the smoke run trains in float32
SMOKE_VARIANTS = "fd-qkov"


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- stage 1: setup

LAUNCHERS = {
    "fairseq-preprocess": "from fairseq_cli.preprocess import cli_main as main",
    "fairseq-train": "from fairseq_cli.train import cli_main as main",
    "fairseq-generate": "from fairseq_cli.generate import cli_main as main",
    "fairseq-interactive": "from fairseq_cli.interactive import cli_main as main",
    "fnl": "from fnl_transformers.cli import main",
}
BUILD_EXTENSIONS = r"""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
args = ["-std=c++11", "-O3"]
np = [numpy.get_include()]
exts = [
    Extension("fairseq.libbleu", ["fairseq/clib/libbleu/libbleu.cpp", "fairseq/clib/libbleu/module.cpp"],
              extra_compile_args=args),
    Extension("fairseq.data.data_utils_fast", ["fairseq/data/data_utils_fast.pyx"], language="c++",
              extra_compile_args=args, include_dirs=np),
    Extension("fairseq.data.token_block_utils_fast", ["fairseq/data/token_block_utils_fast.pyx"], language="c++",
              extra_compile_args=args, include_dirs=np),
]
setup(name="fairseq-extensions", ext_modules=cythonize(exts, language_level=3, quiet=True),
      script_args=["build_ext", "--inplace", "-j", "8"])
"""


def _importable(module: str) -> bool:
    res = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    return res.returncode == 0


def _dist_version(name: str) -> Optional[tuple]:
    code = f"import importlib.metadata as m; print(m.version({name!r}))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return tuple(int(x) for x in re.findall(r"\d+", res.stdout)[:2])


def _prepend_env(name: str, *paths: str) -> None:
    old = os.environ.get(name)
    os.environ[name] = os.pathsep.join(list(paths) + ([old] if old else []))


def setup_environment(work: str, carry: str, force: bool) -> dict:
    """Make fairseq, its dependencies, transformers >= 5.19, the launchers and this repository importable."""
    info: Dict[str, object] = {"installed": [], "fairseq_built": False}
    site, src, bin_dir = (os.path.join(work, d) for d in ("site", "fairseq-src", "bin"))
    os.makedirs(bin_dir, exist_ok=True)
    need_fairseq = force or not _importable("fairseq")
    tf = _dist_version("transformers")
    need_transformers = force or tf is None or tf < MIN_TRANSFORMERS
    if need_fairseq or need_transformers:
        wheels = sorted(glob.glob(os.path.join(carry, "*.whl")))
        if not need_transformers:
            wheels = [w for w in wheels if not os.path.basename(w).startswith("transformers-")]
        if not need_fairseq:
            wheels = [w for w in wheels if os.path.basename(w).startswith("transformers-")]
        sdists = glob.glob(os.path.join(carry, "fairseq_fixed-*.tar.gz"))
        if not wheels or (need_fairseq and not sdists):
            raise SystemExit(
                f"gpu-check: error: fairseq or transformers >= 5.19 is missing and {carry} does not "
                "hold them; run `make gpu-carry` on a machine with network access first"
            )
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            site,
        ] + wheels
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"installing carried wheels failed:\n{(res.stdout + res.stderr)[-3000:]}")
        info["installed"] = [os.path.basename(w) for w in wheels]
        if need_fairseq:
            if not os.path.exists(os.path.join(src, ".built")):
                shutil.rmtree(src, ignore_errors=True)
                with tarfile.open(sdists[0]) as tar:
                    top = tar.getnames()[0].split("/")[0]
                    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.12
                    tar.extractall(work, **safe)
                os.rename(os.path.join(work, top), src)
                res = subprocess.run([sys.executable, "-c", BUILD_EXTENSIONS], cwd=src, capture_output=True, text=True)
                if res.returncode != 0:
                    raise RuntimeError(f"building fairseq's extensions failed:\n{(res.stdout + res.stderr)[-3000:]}")
                open(os.path.join(src, ".built"), "w").close()
            info["fairseq_built"] = True
    paths = [p for p in (site, src) if os.path.isdir(p)] + [ROOT]
    _prepend_env("PYTHONPATH", *paths)
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    for name, line in LAUNCHERS.items():
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write(f"#!{sys.executable}\nimport sys\n{line}\nsys.exit(main())\n")
        os.chmod(path, 0o755)
    _prepend_env("PATH", bin_dir)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return info


def software_versions() -> dict:
    code = (
        "import json, importlib.metadata as m, platform, torch\n"
        "v = lambda n: (m.version(n) if n else None)\n"
        "out = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,\n"
        "       'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}\n"
        "for n in ('transformers', 'accelerate', 'fairseq-fixed', 'hydra-core', 'omegaconf'):\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = None\n"
        "import fairseq; out['fairseq'] = fairseq.__version__\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    out = json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr[-500:]}
    try:
        out["fnl_transformers_commit"] = (
            subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
            or None
        )
    except OSError:
        out["fnl_transformers_commit"] = None
    return out


def device_info(cpu: bool) -> dict:
    import torch

    if cpu:
        return {"name": platform.processor() or platform.machine(), "type": "cpu", "count": 0}
    p = torch.cuda.get_device_properties(0)
    return {
        "name": torch.cuda.get_device_name(0),
        "type": "cuda",
        "count": torch.cuda.device_count(),
        "capability": f"{p.major}.{p.minor}",
        "memory_gib": round(p.total_memory / 2**30, 1),
        "multiprocessors": p.multi_processor_count,
        "bf16": bool(torch.cuda.is_bf16_supported()),
    }


# ---------------------------------------------------------------- stage 2: tests


def _save_log(log_dir: Optional[str], name: str, text: str) -> None:
    if log_dir:
        with open(os.path.join(log_dir, name), "w") as f:
            f.write(text)


def run_tests(smoke: bool, timeout: float, log_dir: Optional[str] = None) -> dict:
    if smoke:  # the same file, CPU cases only: the GPU cases would all be skipped here
        select = ["tests/test_gpu.py", "-m", "not gpu and not slow", "-k", "spectral_init_of_half or fd_and_backward"]
    else:
        select = ["tests/test_gpu.py", "-m", "gpu"]  # every gpu test lives there; other files need test extras
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *select]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), -1
    _save_log(log_dir, "tests.log", out)
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    last = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line)]
    if last:
        for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last[-1]):
            counts["errors" if k.startswith("error") else k] = int(n)
    skips = sorted({re.sub(r"^SKIPPED \[\d+\] ", "", line) for line in out.splitlines() if line.startswith("SKIPPED")})
    return {
        "command": "python -m pytest " + " ".join(shlex.quote(a) for a in cmd[3:]),
        "exit_code": rc,
        "seconds": round(time.perf_counter() - t0, 1),
        **counts,
        "skip_reasons": skips,
        "output_tail": out[-3000:],
    }


# ---------------------------------------------------------------- stage 3: timings


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_timings(work: str, smoke: bool, arch: str, model_flags: List[str], max_tokens: int, repeats: int) -> dict:
    from bench.fairseq_common import Run, make_data, train_argv, train_flops
    from bench.fd_overhead import with_criterion

    vocab, n_train, mean_len = (300, 96, 10) if smoke else (8000, 1200, 24)
    data = make_data(os.path.join(work, "timing-data"), n_train, mean_len=mean_len, vocab=vocab)
    base = train_argv(data, os.path.join(work, "timing-ck"), arch, *model_flags, max_tokens=max_tokens)
    if not smoke:
        base.remove("--cpu")
    cases = {  # name: (precision, rank scale, FD)
        "dense": ("fp32", None, False),
        "dense+fd": ("fp32", None, True),
        "rank0.5": ("fp32", 0.5, False),
        "rank0.25": ("fp32", 0.25, False),
    }
    if not smoke:  # half precision only where it is fast (fairseq's --fp16 on a CPU runs, slowly)
        cases.update(
            {
                "dense-fp16": ("fp16", None, False),
                "dense+fd-fp16": ("fp16", None, True),
                "rank0.5-fp16": ("fp16", 0.5, False),
            }
        )
    runs, errors = {}, {}
    for name, (prec, rank, fd) in cases.items():
        argv = list(base) + (FP16_FLAGS if prec == "fp16" else [])
        if rank is not None:
            argv += ["--rank-scale", str(rank)]
        if fd:
            argv = with_criterion(argv, "fd_label_smoothed_cross_entropy", FD_FLAGS)
        try:
            runs[name] = Run(argv)
        except Exception as e:  # recorded; the other cases still run
            errors[name] = f"{type(e).__name__}: {e}"
    sample = max(runs["dense"].samples(4), key=lambda s: s["ntokens"])
    on_device = sample
    if not smoke:  # train_step moves batches itself; the FLOP count calls the criterion directly
        from fairseq import utils

        on_device = utils.move_to_cuda(sample)
    flops = {}
    for name in ("dense", "rank0.5", "rank0.25"):
        if name in runs:
            flops[name] = train_flops(runs[name], on_device)
    times: Dict[str, List[float]] = {k: [] for k in runs}
    for r in range(2 + repeats):  # 2 warm-up rounds (CUDA kernels, allocator), cases alternating
        for name, run in runs.items():
            _sync()
            t0 = time.perf_counter()
            run.step(sample)
            _sync()
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    tokens = int(sample["ntokens"])
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for name, (prec, rank, fd) in cases.items():
        if name not in med:
            rows.append(
                {
                    "case": name,
                    "precision": prec,
                    "rank_scale": rank,
                    "fd": "qk+ov coupled" if fd else "none",
                    "error": errors.get(name),
                }
            )
            continue
        rows.append(
            {
                "case": name,
                "precision": prec,
                "rank_scale": rank,
                "fd": "qk+ov coupled" if fd else "none",
                "step_s": med[name],
                "tokens_per_s": tokens / med[name],
                "repeats": repeats,
                "flops": flops.get(name),
            }
        )
    ratio = lambda a, b: med[a] / med[b] if a in med and b in med else None  # noqa: E731
    return {
        "target_tokens": tokens,
        "max_tokens": max_tokens,
        "sentences": int(sample["nsentences"]),
        "data": f"synthetic, {vocab}-word vocabulary, mean length {mean_len}",
        "rows": rows,
        "fd_overhead": {"fp32": ratio("dense+fd", "dense"), "fp16": ratio("dense+fd-fp16", "dense-fp16")},
        "lowrank_speedup": {
            "0.5": ratio("dense", "rank0.5"),
            "0.25": ratio("dense", "rank0.25"),
            "0.5-fp16": ratio("dense-fp16", "rank0.5-fp16"),
        },
        "predicted_speedup": {
            r: flops["dense"] / flops[f"rank{r}"] for r in ("0.5", "0.25") if "dense" in flops and f"rank{r}" in flops
        },
        "errors": errors,
    }


# ---------------------------------------------------------------- stage 4: training


def prepare_smoke_corpus(work: str) -> str:
    out = os.path.join(work, "iwslt14-smoke")
    env = dict(os.environ, PYTHON=sys.executable)
    cmd = [
        "bash",
        os.path.join(ROOT, "recipes", "iwslt14", "prepare.sh"),
        "--smoke",
        "--out",
        out,
        "--workers",
        str(min(8, os.cpu_count() or 1)),
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"prepare.sh --smoke failed:\n{(res.stdout + res.stderr)[-3000:]}")
    return os.path.join(out, "bin")


def recipe_command(
    variant: str,
    data: str,
    save_dir: str,
    arch: str,
    model_flags: List[str],
    max_tokens: int,
    updates: int,
    log_interval: int,
    extra: List[str],
) -> List[str]:
    """The fairseq-train command recipes/iwslt14/train.sh runs for VARIANT (its --dry-run), as argv."""
    cmd = [
        "bash",
        os.path.join(ROOT, "recipes", "iwslt14", "train.sh"),
        variant,
        "--data",
        data,
        "--save-dir",
        save_dir,
        "--arch",
        arch,
        "--max-tokens",
        str(max_tokens),
        "--max-update",
        str(updates),
        "--dry-run",
        "--",
        *model_flags,
        "--disable-validation",
        "--no-save",
        "--log-format",
        "json",
        "--log-interval",
        str(log_interval),
        "--no-progress-bar",
        *extra,
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable))
    if res.returncode != 0:
        raise RuntimeError(f"train.sh --dry-run failed:\n{(res.stdout + res.stderr)[-2000:]}")
    argv = shlex.split(res.stdout.strip().splitlines()[-1])
    assert argv[0] == "fairseq-train", argv[:3]
    return argv


def train_variant(
    spec: str,
    data: str,
    work: str,
    arch: str,
    model_flags: List[str],
    max_tokens: int,
    updates: int,
    log_interval: int,
    stop_s: float,
    smoke: bool,
    log_dir: Optional[str] = None,
) -> dict:
    variant, _, prec = spec.partition(":")
    prec = prec or "fp32"
    extra = PRECISION_FLAGS[prec]
    save_dir = os.path.join(work, "train", spec.replace(":", "-"))
    argv = recipe_command(variant, data, save_dir, arch, model_flags, max_tokens, updates, log_interval, extra)
    # train.sh adds --cpu where it finds no GPU device node; the check decides the device itself
    argv = [a for a in argv if a != "--cpu"] + (["--cpu"] if smoke else [])
    argv += ["--stop-time-hours", f"{max(stop_s, 30) / 3600:.4f}"]  # the time budget, fairseq stops cleanly
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.train", *argv[1:]], cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    text = res.stdout + res.stderr
    _save_log(log_dir, f"train-{spec.replace(':', '-')}.log", text)
    if res.returncode != 0:
        raise RuntimeError(f"fairseq-train ({spec}) failed:\n{text[-3000:]}")
    inner = []
    for line in text.splitlines():
        i = line.find("{")
        if i < 0 or "train_inner" not in line:
            continue
        try:
            rec = json.loads(line[i:])
        except json.JSONDecodeError:
            continue
        if "num_updates" in rec and "ups" in rec:
            inner.append(rec)
    if len(inner) < 2:
        raise RuntimeError(f"fairseq-train ({spec}) logged fewer than 2 train_inner records:\n{text[-2000:]}")
    # fairseq's "ups" is the update rate over each log interval (its meter restarts at every record); the first
    # interval (CUDA start-up, allocator warm-up) is left out
    first, last = inner[0], inner[-1]
    counts = [int(b["num_updates"]) - int(a["num_updates"]) for a, b in zip(inner, inner[1:])]
    seconds = [n / float(rec["ups"]) for n, rec in zip(counts, inner[1:])]
    n = sum(counts)
    s_per_update = sum(seconds) / n
    return {
        "variant": variant,
        "precision": prec,
        "updates": int(last["num_updates"]),
        "timed_updates": n,
        "s_per_update": s_per_update,
        "process_wall_s": round(wall, 1),
        "loss_first": float(first["loss"]),
        "loss_last": float(last["loss"]),
        "words_per_update": float(last.get("wpb", 0)) or None,
        "recipe_gpu_hours": None if smoke else RECIPE_MAX_UPDATE * s_per_update / 3600,
        "command": "fairseq-train " + " ".join(shlex.quote(a) for a in argv[1:]),
    }


# ---------------------------------------------------------------- driver


@contextlib.contextmanager
def stage(results: dict, name: str):
    t0 = time.perf_counter()
    log(f"{name} ...")
    try:
        yield
        results["stages"][name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 1)}
    except Exception as e:  # recorded; later stages still run
        results["stages"][name] = {
            "status": "error",
            "seconds": round(time.perf_counter() - t0, 1),
            "error": f"{type(e).__name__}: {e}"[-3000:],
        }
        results["errors"].append(f"{name}: {type(e).__name__}: {str(e)[-800:]}")
        traceback.print_exc()
    log(f"{name}: {results['stages'][name]['status']} ({results['stages'][name]['seconds']} s)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="the same pipeline on the CPU with tiny sizes")
    ap.add_argument("--arch", default=ARCH, help=f"fairseq architecture (default {ARCH})")
    ap.add_argument("--model-flags", default=None, help="model flags (default: the paper's IWSLT shape)")
    ap.add_argument("--max-tokens", type=int, default=None, help="target tokens per batch (default 4000)")
    ap.add_argument("--updates", type=int, default=None, help="training updates per variant (default 2000)")
    ap.add_argument(
        "--variants",
        default=None,
        help="recipe variants to train, VARIANT[:fp16|bf16|amp], "
        f"comma-separated (default {DEFAULT_VARIANTS}; smoke: "
        f"{SMOKE_VARIANTS})",
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per timing case (default 20)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=420,
        help="seconds from the start after which training stops (default 420: under 8 minutes in all)",
    )
    ap.add_argument("--carry", default=CARRY, help="folder of carried packages (make gpu-carry)")
    ap.add_argument("--from-carry", action="store_true", help="install from --carry even when already importable")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new one under /tmp)")
    ap.add_argument(
        "--out", default=None, help="results file (default bench/results-gpu.json, smoke: bench/results-gpu-smoke.json)"
    )
    ap.add_argument("--skip", default="", help="stages to skip, comma-separated: tests,timings,training")
    ap.add_argument("--no-readme", action="store_true", help="do not regenerate the README tables")
    ap.add_argument("--log-dir", default=None, help="also write each stage's full output here")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    t_start = time.perf_counter()
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - {"tests", "timings", "training"}
    if unknown:
        ap.error(f"--skip: unknown stages {sorted(unknown)}; choose among tests, timings, training")
    model_flags = shlex.split(
        args.model_flags if args.model_flags is not None else (SMOKE_MODEL_FLAGS if smoke else MODEL_FLAGS)
    )
    max_tokens = args.max_tokens or (256 if smoke else 4000)
    updates = args.updates or (20 if smoke else 2000)
    repeats = args.repeats or (2 if smoke else 20)
    log_interval = 5 if smoke else 100
    out = args.out or (SMOKE_RESULTS if smoke else RESULTS)
    work = args.work or tempfile.mkdtemp(prefix="fnl-gpu-")
    os.makedirs(work, exist_ok=True)
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    variants = args.variants or (SMOKE_VARIANTS if smoke else DEFAULT_VARIANTS)
    unknown = sorted({s.partition(":")[2] for s in variants.split(",") if s} - set(PRECISION_FLAGS) - {""})
    if unknown:
        ap.error(f"--variants: unknown precision(s) {unknown}; use VARIANT, VARIANT:fp16, VARIANT:bf16 or VARIANT:amp")
    os.environ["PYTHONWARNINGS"] = "ignore"  # fairseq/hydra deprecation chatter; the logs keep what matters
    warnings.simplefilter("ignore")

    import torch

    if smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    elif not torch.cuda.is_available():
        print(
            "gpu-check: error: torch sees no CUDA GPU (torch.cuda.is_available() is False); run it on a machine "
            "with a GPU, or use --cpu-smoke to check the pipeline on a CPU",
            file=sys.stderr,
        )
        return 2

    results: dict = {
        "schema": SCHEMA,
        "kind": "gpu-check",
        "smoke": smoke,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python3 -m bench.gpu_check " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "device": device_info(smoke),
        "software": {},
        "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": {"arch": args.arch, "flags": model_flags, "max_tokens": max_tokens},
        "setup": {},
        "tests": None,
        "timings": None,
        "training": [],
        "stages": {},
        "errors": [],
    }
    with stage(results, "setup"):
        results["setup"] = setup_environment(work, args.carry, args.from_carry)
        results["software"] = software_versions()
    if results["stages"]["setup"]["status"] != "ok":
        return _finish(results, out, t_start, args.no_readme or smoke)
    if "tests" not in skip:
        with stage(results, "tests"):
            results["tests"] = run_tests(smoke, timeout=max(60.0, args.budget_s * 0.6), log_dir=args.log_dir)
            if results["tests"]["failed"] or results["tests"]["errors"] or results["tests"]["exit_code"] not in (0, 5):
                raise RuntimeError(
                    f"pytest: {results['tests']['failed']} failed, {results['tests']['errors']} errors "
                    f"(exit code {results['tests']['exit_code']})"
                )
    if "timings" not in skip:
        with stage(results, "timings"):
            results["timings"] = run_timings(work, smoke, args.arch, model_flags, max_tokens, repeats)
    if "training" not in skip:
        with stage(results, "training"):
            data = prepare_smoke_corpus(work)
            specs = [s for s in variants.split(",") if s]
            for i, spec in enumerate(specs):
                left = args.budget_s - (time.perf_counter() - t_start)
                if left <= 30:
                    results["training"].append(
                        {"variant": spec, "skipped": f"time budget ({args.budget_s:.0f} s) used up"}
                    )
                    continue
                log(f"training {spec} ({updates} updates, {left:.0f} s of budget left)")
                results["training"].append(
                    train_variant(
                        spec,
                        data,
                        work,
                        args.arch,
                        model_flags,
                        max_tokens,
                        updates,
                        log_interval,
                        left / (len(specs) - i),
                        smoke,
                        args.log_dir,
                    )
                )
    return _finish(results, out, t_start, args.no_readme or smoke)


def _finish(results: dict, out: str, t_start: float, no_readme: bool) -> int:
    results["seconds_total"] = round(time.perf_counter() - t_start, 1)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {out} ({results['seconds_total']} s)")
    if not no_readme and not results["errors"]:
        from bench.gpu_report import update_readmes

        for path in update_readmes(out):
            log(f"updated {path}")
    if results["errors"]:
        for e in results["errors"]:
            print(f"gpu-check: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
