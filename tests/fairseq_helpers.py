"""Shared helpers for the fairseq tests: a tiny generated parallel corpus and fairseq runs.

API (kept small on purpose, other test files rely on it):

* ``make_tiny_data(root, n_train=64) -> data_bin``: writes a tiny synthetic corpus (source words ``s0..s23``,
  target = a fixed word mapping in reversed order, so it is learnable) and binarizes it with
  ``fairseq-preprocess --joined-dictionary`` (joined, so ``--share-all-embeddings`` works). Cached per
  session and per ``n_train``: later calls return the first directory made.
* ``user_dir() -> str``: what ``fnl userdir`` prints.
* ``tiny_train_args(data_bin, save_dir, *extra, arch="fnl_transformer_tiny", updates=4) -> argv``: flags of
  a short deterministic CPU run (dropout 0, fixed batch size, json logs every update, no progress bar).
* ``run_fairseq_train(argv, in_process=True, cwd=None) -> FairseqRun``: runs ``fairseq-train`` with ``argv``
  (without the program name) in this process (``fairseq_cli.train.cli_main``) or in a subprocess.
  ``FairseqRun.stats`` is the list of json log records (dicts), ``.train`` / ``.valid`` the per-update
  training records and the validation records, ``.output`` the captured log text.
* ``hypotheses(output) -> {source: (hypothesis, score)}`` from generate / interactive output.
* ``build_model(argv, seed=1) -> (model, task, args)``: parse training flags (``tiny_train_args(...)``) and
  build the task and model in this process exactly as ``fairseq-train`` does (seeded the same way).
* ``run_fairseq_cli(name, argv, stdin=None, cwd=None) -> subprocess.CompletedProcess``: any fairseq console
  command (``generate``, ``interactive``, ...) in a subprocess (``python -m fairseq_cli.<name>``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

VOCAB = 24
_DATA_CACHE: Dict[tuple, str] = {}


def _sentence_pair(rng: random.Random):
    n = rng.randint(3, 8)
    src = [rng.randrange(VOCAB) for _ in range(n)]
    tgt = [(7 * w + 3) % VOCAB for w in reversed(src)]
    return " ".join(f"s{w}" for w in src), " ".join(f"t{w}" for w in tgt)


def _write_split(prefix: str, n: int, rng: random.Random) -> None:
    pairs = [_sentence_pair(rng) for _ in range(n)]
    with open(prefix + ".src", "w") as fs, open(prefix + ".tgt", "w") as ft:
        for s, t in pairs:
            fs.write(s + "\n")
            ft.write(t + "\n")


def make_tiny_data(root, n_train: int = 64, n_valid: int = 16, n_test: int = 8, seed: int = 0) -> str:
    """Generate and binarize a tiny src->tgt corpus under ``root``; returns the data-bin directory."""
    key = (n_train, n_valid, n_test, seed)
    cached = _DATA_CACHE.get(key)
    if cached and os.path.exists(os.path.join(cached, "dict.src.txt")):
        return cached
    base = os.path.join(str(root), f"tiny-{n_train}-{n_valid}-{n_test}-{seed}")
    raw, data_bin = os.path.join(base, "raw"), os.path.join(base, "data-bin")
    done = os.path.join(base, "DONE")
    if os.path.exists(done):  # made earlier (same root)
        _DATA_CACHE[key] = data_bin
        return data_bin
    shutil.rmtree(base, ignore_errors=True)  # a partial earlier attempt
    os.makedirs(raw, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        _write_split(os.path.join(raw, split), n, rng)
    from fairseq import options
    from fairseq_cli import preprocess

    parser = options.get_preprocessing_parser()
    args = parser.parse_args(
        [
            "--source-lang",
            "src",
            "--target-lang",
            "tgt",
            "--trainpref",
            os.path.join(raw, "train"),
            "--validpref",
            os.path.join(raw, "valid"),
            "--testpref",
            os.path.join(raw, "test"),
            "--destdir",
            data_bin,
            "--joined-dictionary",
            "--workers",
            "1",
        ]
    )
    with _quiet_logging():
        preprocess.main(args)
    open(done, "w").close()
    _DATA_CACHE[key] = data_bin
    return data_bin


def user_dir() -> str:
    from fnl_transformers.userdir import user_dir_path

    return user_dir_path()


def tiny_train_args(
    data_bin: str,
    save_dir: str,
    *extra: str,
    arch: str = "fnl_transformer_tiny",
    updates: int = 4,
    user_dir_flag: bool = True,
) -> List[str]:
    """argv (without program name) of a short, deterministic CPU training run."""
    argv = [
        data_bin,
        "--task",
        "translation",
        "--source-lang",
        "src",
        "--target-lang",
        "tgt",
        "--arch",
        arch,
        "--optimizer",
        "adam",
        "--lr",
        "0.005",
        "--lr-scheduler",
        "fixed",
        "--criterion",
        "label_smoothed_cross_entropy",
        "--label-smoothing",
        "0.1",
        "--batch-size",
        "16",
        "--required-batch-size-multiple",
        "1",
        "--max-update",
        str(updates),
        "--dropout",
        "0",
        "--attention-dropout",
        "0",
        "--activation-dropout",
        "0",
        "--seed",
        "1",
        "--cpu",
        "--num-workers",
        "0",
        "--save-dir",
        save_dir,
        "--log-format",
        "json",
        "--log-interval",
        "1",
        "--no-progress-bar",
        "--no-epoch-checkpoints",
    ]
    if user_dir_flag:
        argv += ["--user-dir", user_dir()]
    return argv + list(extra)


@dataclass
class FairseqRun:
    output: str
    stats: List[dict] = field(default_factory=list)

    @property
    def train(self) -> List[dict]:
        """Per-update training records (json log lines with a ``loss`` key)."""
        return [s for s in self.stats if "loss" in s and "train_loss" not in s]

    @property
    def valid(self) -> List[dict]:
        return [s for s in self.stats if "valid_loss" in s]

    @property
    def end_of_epoch(self) -> List[dict]:
        return [s for s in self.stats if "train_loss" in s]


def _parse_stats(text: str) -> List[dict]:
    stats = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            stats.append(record)
    return stats


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: List[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _quiet_logging():
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(old)


def _reset_fairseq_globals() -> None:
    """fairseq keeps the best validation loss of a run in function attributes; clear them between runs."""
    from fairseq import checkpoint_utils
    from fairseq_cli import train

    for fn in (checkpoint_utils.save_checkpoint, train.should_stop_early):
        for attr in ("best", "num_runs"):
            if hasattr(fn, attr):
                delattr(fn, attr)


def run_fairseq_train(
    argv: Sequence[str],
    in_process: bool = True,
    cwd: Optional[str] = None,
    env: Optional[dict] = None,
    timeout: float = 600,
) -> FairseqRun:
    """Run ``fairseq-train argv``; raises ``RuntimeError`` with the log when it fails."""
    argv = [str(a) for a in argv]
    if not in_process:
        res = subprocess.run(
            [sys.executable, "-m", "fairseq_cli.train", *argv],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=timeout,
        )
        text = res.stdout + res.stderr
        if res.returncode != 0:
            raise RuntimeError(f"fairseq-train failed (exit {res.returncode}):\n{text[-6000:]}")
        return FairseqRun(text, _parse_stats(text))
    from fairseq_cli import train

    _reset_fairseq_globals()
    handler = _ListHandler()
    root = logging.getLogger()
    old_level, old_argv, old_cwd, old_handlers = root.level, sys.argv, os.getcwd(), list(root.handlers)
    for h in old_handlers:  # fairseq's stderr handler: the log is returned (and shown on failure) instead
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    sys.argv = ["fairseq-train", *argv]
    try:
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(io.StringIO()):
            train.cli_main()
    except BaseException as exc:  # SystemExit from argparse included
        raise RuntimeError(f"fairseq-train failed: {exc!r}\n" + "\n".join(handler.lines[-60:])) from exc
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        root.removeHandler(handler)
        for h in old_handlers:
            root.addHandler(h)
        root.setLevel(old_level)
    text = "\n".join(handler.lines)
    return FairseqRun(text, _parse_stats(text))


def run_fairseq_cli(
    name: str,
    argv: Sequence[str],
    stdin: Optional[str] = None,
    cwd: Optional[str] = None,
    env: Optional[dict] = None,
    timeout: float = 600,
    check: bool = True,
    in_process: bool = False,
):
    """``fairseq-<name> argv`` (``name``: ``generate``, ``interactive``, ...) in a subprocess, or in this process
    (``fairseq_cli.<name>.cli_main`` with ``sys.argv``/``sys.stdin``/``sys.stdout`` patched). Returns a
    ``subprocess.CompletedProcess`` (text); with ``check`` a failure raises ``RuntimeError`` with the output."""
    argv = [str(a) for a in argv]
    if not in_process:
        res = subprocess.run(
            [sys.executable, "-m", f"fairseq_cli.{name}", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"fairseq-{name} failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-6000:]}")
        return res
    module = importlib.import_module(f"fairseq_cli.{name}")
    handler = _ListHandler()
    root = logging.getLogger()
    old = (sys.argv, sys.stdin, os.getcwd(), list(root.handlers), root.level)
    for h in old[3]:
        root.removeHandler(h)
    root.addHandler(handler)
    out = io.StringIO()
    sys.argv = [f"fairseq-{name}", *argv]
    sys.stdin = io.StringIO(stdin or "")
    rc = 0
    try:
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out):
            module.cli_main()
    except BaseException as exc:  # noqa: BLE001  (SystemExit from argparse included)
        rc = getattr(exc, "code", 1) or 1
        if check:
            raise RuntimeError(f"fairseq-{name} failed: {exc!r}\n" + "\n".join(handler.lines[-40:])) from exc
    finally:
        sys.argv, sys.stdin = old[0], old[1]
        os.chdir(old[2])
        root.removeHandler(handler)
        for h in old[3]:
            root.addHandler(h)
        root.setLevel(old[4])
    return subprocess.CompletedProcess([f"fairseq-{name}", *argv], rc, out.getvalue(), "\n".join(handler.lines))


def hypotheses(output: str) -> Dict[str, tuple]:
    """``{source: (hypothesis, score)}`` from fairseq-generate / fairseq-interactive output (``S-``/``H-`` lines)."""
    src, hyp = {}, {}
    for line in output.splitlines():
        parts = line.split("\t")
        if line.startswith("S-") and len(parts) >= 2:
            src[parts[0][2:]] = parts[1]
        elif line.startswith("H-") and len(parts) >= 3:
            hyp[parts[0][2:]] = (parts[2], float(parts[1]))
    return {src[i]: hyp[i] for i in hyp if i in src}


def build_model(argv: Sequence[str], seed: Optional[int] = None):
    """(model, task, args) built from fairseq-train flags, with fairseq-train's seeding (``--seed`` unless
    ``seed`` is given)."""
    from fairseq import options, tasks, utils

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=[str(a) for a in argv])
    utils.set_torch_seed(args.seed if seed is None else seed)
    task = tasks.setup_task(args)
    model = task.build_model(args)
    return model, task, args
