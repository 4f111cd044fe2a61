"""Distributed data parallel (2 CPU processes, gloo) with FNLTrainer equals one process with the same global batch.

Worker: tests/hf_trainer_ddp_script.py (coupled FD with AdamW, and decoupled FD with FLAMBe; 3 updates each).
Global batch 4 = 1 process x 4 = 2 processes x 2 = 2 processes x 1 x 2 accumulation steps. Tolerance: max
|difference| relative to the single-process run's movement < 1e-3 (measured <= 2.7e-5: the same sums in another
order, amplified by Adam in near-zero gradients; 1e-3 leaves 37x); a scale error in the loss or FD (counted per
process or per micro-batch) or a different data order gives > 1e-2.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from hf_trainer_helpers import max_rel_diff, params, tiny_bert  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "hf_trainer_ddp_script.py")
TOL = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return torch.load(out, weights_only=True)


def _torchrun(out, *args):
    return _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            SCRIPT,
            "--out",
            str(out),
            *args,
        ],
        out,
    )


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(tmp_path):
    single = _run(
        [sys.executable, SCRIPT, "--out", str(tmp_path / "single.pt"), "--batch", "4"], tmp_path / "single.pt"
    )
    ddp = _torchrun(tmp_path / "ddp.pt", "--batch", "2")
    ddp_ga = _torchrun(tmp_path / "ddp_ga.pt", "--batch", "1", "--accum", "2")
    start = params(tiny_bert())
    for run in ("coupled", "flambe"):
        assert int(single[run + "/world_size"]) == 1
        assert int(ddp[run + "/world_size"]) == 2 and int(ddp_ga[run + "/world_size"]) == 2
        assert max_rel_diff(ddp[run], single[run], start) < TOL, run
        assert max_rel_diff(ddp_ga[run], single[run], start) < TOL, run
