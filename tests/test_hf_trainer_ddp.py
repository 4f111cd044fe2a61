"""Distributed data parallel (2 CPU processes, gloo) with FNLTrainer equals one process with the same global batch.

Worker: tests/hf_trainer_ddp_script.py (coupled FD with AdamW, and decoupled FD with FLAMBe; 3 updates each).
Global batch 4 = 1 process x 4 = 2 processes x 2 = 2 processes x 1 x 2 accumulation steps. Tolerance: max
|difference| relative to the single-process run's movement < 1e-3 (measured <= 2.7e-5: the same sums in another
order, amplified by Adam in near-zero gradients; 1e-3 leaves 37x); a scale error in the loss or FD (counted per
process or per micro-batch) or a different data order gives > 1e-2.
"""

import os
import sys

import pytest

pytest.importorskip("transformers")

from distributed_helpers import run_worker, torchrun_worker  # noqa: E402
from hf_trainer_helpers import max_rel_diff, params, tiny_bert  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "hf_trainer_ddp_script.py")
TOL = 1e-3


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(tmp_path):
    single = run_worker(
        [sys.executable, SCRIPT, "--out", str(tmp_path / "single.pt"), "--batch", "4"], tmp_path / "single.pt"
    )
    ddp = torchrun_worker(SCRIPT, tmp_path / "ddp.pt", "--batch", "2")
    ddp_ga = torchrun_worker(SCRIPT, tmp_path / "ddp_ga.pt", "--batch", "1", "--accum", "2")
    start = params(tiny_bert())
    for run in ("coupled", "flambe"):
        assert int(single[run + "/world_size"]) == 1
        assert int(ddp[run + "/world_size"]) == 2 and int(ddp_ga[run + "/world_size"]) == 2
        assert max_rel_diff(ddp[run], single[run], start) < TOL, run
        assert max_rel_diff(ddp_ga[run], single[run], start) < TOL, run
