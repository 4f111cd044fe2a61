"""Reliability of the fairseq plugin end to end: gradient accumulation, resume, 2-worker distributed
training, bad input.

Comparisons read the parameters from the checkpoints fairseq writes (through its own, safe, loader).

Tolerances: runs that only sum the same per-sentence gradients in a different order (``--update-freq 2`` vs one
batch twice as large, 2 workers vs 1) agree to ``ATOL = 5e-5`` absolute on every parameter after 3 updates of
Adam at lr 5e-3 (float32 sums differ in the last bits and Adam divides small gradients by their own size;
measured: 3.5e-6 for --update-freq 2 vs a doubled batch, exactly 0 for 2 workers vs one process with
--update-freq 2). Key biases are left out of that comparison: their gradient is exactly zero (a per-query
constant the softmax ignores, see ``core/attention.py``), so Adam's normalized step on them is pure rounding
noise (up to lr per update). A control run with the FD coefficients doubled (what counting FD twice per update
would do) differs by more than ``100 * ATOL`` (measured: 2.9e-2), so the tolerance is far below the effect being
tested. The logged losses are rounded to 3 decimals, so runs that differ in the last float32 bits may print
them one unit (1e-3) apart. Resume repeats the same operations in the same order: parameters and logged losses
must be bitwise equal (measured: 0).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from distributed_helpers import free_port
from fairseq_helpers import make_tiny_data, run_fairseq_train, tiny_train_args

pytest.importorskip("fairseq")

ATOL = 5e-5

# low-rank FFN/embeddings with SI, reduced heads, FD on every kind, weight decay on the other parameters
FD_ARGS = [
    "--rank-scale",
    "0.5",
    "--spectral-init",
    "--head-dim",
    "6",
    "--criterion",
    "fd_label_smoothed_cross_entropy",
    "--fd-qk",
    "0.05",
    "--fd-ov",
    "0.05",
    "--fd-linear",
    "0.05",
    "--optimizer",
    "fnl_adam",
    "--weight-decay",
    "0.01",
]
DOUBLED_FD = ["--fd-qk", "0.1", "--fd-ov", "0.1", "--fd-linear", "0.1"]


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    """16 training sentences: one update of 16 sentences (or 2 x 8) is exactly one epoch, so every way of
    forming the global batch sees the same sentences in every update."""
    return make_tiny_data(tmp_path_factory.mktemp("data16"), n_train=16)


@pytest.fixture(scope="module")
def data64(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data64"))


def _params(path: str) -> dict:
    from fairseq import checkpoint_utils

    return checkpoint_utils.load_checkpoint_to_cpu(path)["model"]


def _max_diff(a: dict, b: dict, skip_key_bias: bool = False) -> float:
    assert a.keys() == b.keys()
    keys = [k for k in a if a[k].is_floating_point() and not (skip_key_bias and k.endswith("k_proj.bias"))]
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)


def _train(data_bin, save_dir, *extra, updates):
    return run_fairseq_train(
        tiny_train_args(
            data_bin,
            str(save_dir),
            *FD_ARGS,
            *extra,
            updates=updates,
        )
        + ["--disable-validation"]
    )


def _losses(run) -> list:
    return [(int(r["num_updates"]), r["loss"]) for r in run.train]  # json log values are strings


# ---------------------------------------------------------------- gradient accumulation


def test_update_freq_2_equals_doubled_batch(data16, tmp_path):
    big = _train(data16, tmp_path / "big", "--batch-size", "16", updates=3)
    acc = _train(data16, tmp_path / "acc", "--batch-size", "8", "--update-freq", "2", updates=3)
    _train(data16, tmp_path / "fd2", "--batch-size", "16", *DOUBLED_FD, updates=3)  # FD counted twice
    p_big, p_acc = _params(tmp_path / "big" / "checkpoint_last.pt"), _params(tmp_path / "acc" / "checkpoint_last.pt")
    p_control = _params(tmp_path / "fd2" / "checkpoint_last.pt")
    assert len(big.train) == len(acc.train) == 3
    assert _max_diff(p_big, p_acc, skip_key_bias=True) <= ATOL
    assert [n for n, _ in _losses(big)] == [n for n, _ in _losses(acc)]
    # printed with 3 decimals: at most one print unit apart (1.5e-3 leaves room for the binary representation)
    assert [float(v) for _, v in _losses(acc)] == pytest.approx([float(v) for _, v in _losses(big)], abs=1.5e-3)
    assert _max_diff(p_big, p_control) > 100 * ATOL  # FD counted twice would be caught


# ---------------------------------------------------------------- resume

RESUME_ARGS = [
    "--optimizer",
    "flambe",
    "--fd-qk",
    "1e-3",
    "--fd-ov",
    "1e-3",
    "--fd-linear",
    "1e-3",
    "--fd-mode",
    "decoupled",
    "--weight-decay",
    "0.01",
    "--lr",
    "0.01",
    "--lr-scheduler",
    "inverse_sqrt",
    "--warmup-updates",
    "3",
    "--dropout",
    "0.1",
]


def test_resume_mid_epoch_equals_uninterrupted(data64, tmp_path):
    """64 sentences in batches of 16: stop after update 2 (mid-epoch), resume to 6 (into epoch 2)."""
    base = [
        "--rank-scale",
        "0.5",
        "--spectral-init",
        "--deep",
        "--head-dim-qk",
        "4",
        "--spectral-init-qk",
        *RESUME_ARGS,
    ]

    def train(save_dir, updates):
        return run_fairseq_train(tiny_train_args(data64, str(save_dir), *base, updates=updates))

    full = train(tmp_path / "full", 6)
    first = train(tmp_path / "resumed", 2)
    second = train(tmp_path / "resumed", 6)  # finds checkpoint_last.pt in --save-dir and resumes
    assert "Loaded checkpoint" in second.output
    assert [n for n, _ in _losses(second)] == [3, 4, 5, 6]
    assert _losses(first) + _losses(second) == _losses(full)
    a = _params(tmp_path / "full" / "checkpoint_last.pt")
    b = _params(tmp_path / "resumed" / "checkpoint_last.pt")
    assert _max_diff(a, b) == 0.0  # bitwise: the same operations in the same order, in the same process
    assert [r["valid_loss"] for r in second.valid][-1] == [r["valid_loss"] for r in full.valid][-1]


# ---------------------------------------------------------------- distributed


def _two_workers(argv, log_dir, timeout=600) -> None:
    """``fairseq-train argv`` as 2 CPU workers (gloo, explicit ranks, no spawn): fairseq's way for CPUs."""
    port = free_port("localhost")
    dist = [
        "--distributed-world-size",
        "2",
        "--distributed-no-spawn",
        "--ddp-backend",
        "legacy_ddp",
        "--distributed-backend",
        "gloo",
        "--distributed-init-method",
        f"tcp://localhost:{port}",
    ]
    procs, logs = [], []
    try:
        for rank in (0, 1):
            log = open(os.path.join(log_dir, f"rank{rank}.log"), "w")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "fairseq_cli.train", *argv, *dist, "--distributed-rank", str(rank)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    if any(codes):
        text = open(os.path.join(log_dir, "rank0.log")).read()[-4000:]
        text += open(os.path.join(log_dir, "rank1.log")).read()[-4000:]
        raise AssertionError(f"2-worker fairseq-train failed with exit codes {codes}:\n{text}")


@pytest.mark.slow
def test_two_workers_equal_one_process_and_resume(data16, tmp_path):
    """2 workers x batch 8 = one process x batch 8 x update-freq 2 (the same two batches per update); then both
    resume for one more update (the 2-worker resume loads on rank 0 and broadcasts the state, safely)."""
    single = tmp_path / "single"
    _train(data16, single, "--batch-size", "8", "--update-freq", "2", updates=2)
    shutil.copy(single / "checkpoint_last.pt", tmp_path / "single_2.pt")
    _train(data16, single, "--batch-size", "8", "--update-freq", "2", updates=3)

    multi = tmp_path / "multi"
    multi.mkdir()

    def argv(updates):
        return tiny_train_args(data16, str(multi), *FD_ARGS, "--batch-size", "8", updates=updates) + [
            "--disable-validation"
        ]

    _two_workers(argv(2), str(tmp_path))
    assert _max_diff(_params(tmp_path / "single_2.pt"), _params(multi / "checkpoint_last.pt"), True) <= ATOL
    _two_workers(argv(3), str(tmp_path))
    assert (
        "Loaded checkpoint" in open(tmp_path / "rank1.log").read()
        or "Loaded checkpoint" in open(tmp_path / "rank0.log").read()
    )
    assert _max_diff(_params(single / "checkpoint_last.pt"), _params(multi / "checkpoint_last.pt"), True) <= ATOL


# ---------------------------------------------------------------- bad input


def _failure(data_bin, save_dir, *extra):
    """Run fairseq-train in this process and return the exception the user sees (type: message)."""
    with pytest.raises(RuntimeError) as info:
        run_fairseq_train(tiny_train_args(data_bin, str(save_dir), *extra, updates=1))
    return info.value.__cause__


def test_unknown_architecture(data64, tmp_path, capsys):
    exc = _failure(data64, tmp_path, "--arch", "fnl_transformer_huge")
    assert isinstance(exc, SystemExit) and exc.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "invalid choice: 'fnl_transformer_huge'" in last and "'fnl_transformer_tiny'" in last


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--head-dim", "9"], "--head-dim-qk 9 does not fit encoder.layers.0.self_attn: its heads have dimension 8"),
        (["--head-dim-ov", "0"], "--head-dim-ov must be a positive integer"),
        (["--rank-scale", "0"], "--rank-scale must be a finite number > 0"),
        (["--rank-scale", "-0.5"], "--rank-scale must be a finite number > 0"),
        (["--rank-scale", "nan"], "--rank-scale must be a finite number > 0"),
        (["--deep"], "--deep needs --rank-scale"),
    ],
)
def test_bad_model_options(data64, tmp_path, extra, expected):
    exc = _failure(data64, tmp_path, *extra)
    assert isinstance(exc, ValueError) and expected in str(exc)
    assert "\n" not in str(exc)
    assert not os.path.exists(tmp_path / "checkpoint_last.pt")


def test_checkpoint_from_a_different_configuration(data64, tmp_path):
    run_fairseq_train(tiny_train_args(data64, str(tmp_path / "a"), "--rank-scale", "0.5", updates=1))
    exc = _failure(
        data64, tmp_path / "b", "--rank-scale", "0.25", "--restore-file", str(tmp_path / "a" / "checkpoint_last.pt")
    )
    # fairseq wraps the model's error: "Cannot load model parameters ...; please ensure that the architectures
    # match", raised while handling ours, which names the mismatching tensors and the fix
    assert "architectures match" in str(exc)
    cause = exc.__context__
    assert isinstance(cause, ValueError)
    assert "does not match this fnl_transformer configuration" in str(cause) and "--rank-scale" in str(cause)
    assert not os.path.exists(tmp_path / "b" / "checkpoint_last.pt")


def test_missing_data_dir(tmp_path):
    exc = _failure(str(tmp_path / "no-data"), tmp_path / "ck")
    assert isinstance(exc, FileNotFoundError) and "no-data" in str(exc)
