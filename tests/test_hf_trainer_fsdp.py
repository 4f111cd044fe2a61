"""FNLTrainer on an FSDP2-sharded model (2 CPU processes, gloo) equals one process with whole parameters.

Worker: tests/hf_trainer_fsdp_script.py: the patched tiny BERT is sharded with ``fully_shard`` (each encoder layer,
then the root; every parameter along dim 0: q/k/v split between their heads, FFN factors and output projections
along their contracted dimension) and trained 3 updates with coupled FD (AdamW), FLAMBe and AdamWFD built by
FNLTrainer, and a FLAMBe with ``max_grad_norm`` passed in ``optimizers`` (its pre-normalization changes the result
by 0.11, so it acts). Global batch 4 = 1 process x 4 = 2 processes x 2 = 2 processes x 1 x 2 accumulation steps.

Tolerances: parameters, max |difference| relative to the single-process run's movement < 1e-3 (measured <= 2.2e-5
for all four runs, with and without accumulation: the same sums in another order, amplified by Adam in
near-zero gradients; 1e-3 leaves 45x; halving the FD gradient on the shards gives 1.16); logged loss and FD value
per kind, relative 1e-5 (measured <= 1.2e-7). Every FD call sends exactly one all-reduce of the size the dry run
(``core.sharded.fd_comm_log`` on the unsharded model) counts, and torch sees no other collective (no all-gather:
no factor is ever materialized); the worker also makes every other torch.distributed collective raise while FD runs.
"""

import os
import re
import sys

import pytest
import torch

pytest.importorskip("transformers")

from distributed_helpers import run_worker, torchrun_worker  # noqa: E402
from hf_trainer_helpers import FD, MLMData, max_rel_diff, params, tiny_bert, training_args  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "hf_trainer_fsdp_script.py")
TOL, VALUE_TOL, STEPS = 1e-3, 1e-5, 3
RUNS = ("coupled", "flambe", "adamwfd", "flambe_clip")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= VALUE_TOL * float(b.abs().max())


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """The three launches (one process; 2 processes; 2 processes with accumulation), shared by the tests here."""
    tmp = tmp_path_factory.mktemp("fsdp")
    single = run_worker(
        [sys.executable, SCRIPT, "--out", str(tmp / "single.pt"), "--batch", "4"], tmp / "single.pt", weights_only=False
    )
    fsdp = torchrun_worker(SCRIPT, tmp / "fsdp.pt", "--batch", "2", "--refusals", weights_only=False)
    fsdp_ga = torchrun_worker(SCRIPT, tmp / "fsdp_ga.pt", "--batch", "1", "--accum", "2", weights_only=False)
    return single, fsdp, fsdp_ga


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process(launches):
    from fnl_transformers.core.sharded import fd_comm_log

    single, fsdp, fsdp_ga = launches
    model = tiny_bert()
    start, n_params = params(model), len(list(model.parameters()))
    for sharded, accum in ((fsdp, 1), (fsdp_ga, 2)):
        for run in RUNS:
            assert int(single[run + "/dtensors"]) == 0 and int(sharded[run + "/dtensors"]) == n_params
            assert max_rel_diff(sharded[run], single[run], start) < TOL, (run, accum)
            assert _close(sharded[run + "/loss"], single[run + "/loss"]), (run, accum)  # task loss + coupled FD
            assert _close(sharded[run + "/fd"], single[run + "/fd"]), (run, accum)  # fnl/<kind>/fd
            calls = sharded[run + "/fd_calls"]
            assert [c["dry"] for c in calls[:1]] == [True]  # FNLTrainer checks the layouts once, sending nothing
            updates = [c for c in calls[1:] if len([v for v in c["coeffs"].values() if v]) > 1]  # every kind at once
            assert len(updates) == STEPS * (accum if run == "coupled" else 1), (run, accum)  # then once per kind
            assert sorted(k for c in calls[1:] if c not in updates for k in c["coeffs"]) == sorted(FD), run
            for call in calls:
                expected = [list(c) for c in fd_comm_log(model, call["coeffs"], 2).calls]
                assert call["log"] == expected, (run, call)  # one all-reduce of the counted k x k pieces
                sent = {"c10d.allreduce_": 1} if expected and not call["dry"] else {}
                assert call["ops"] == sent, (run, call)  # and nothing else: no all-gather
            assert updates[0]["log"][0][1] > 0


@pytest.mark.slow
def test_what_cannot_work_on_shards_is_refused(launches):
    """One line each, naming the order or setting that works (2 processes: the refusals of the worker)."""
    refusals = launches[1]["refusals"]
    assert all("\n" not in message for message in refusals.values()), refusals
    assert re.fullmatch(
        r"patch_model cannot factorize a model whose parameters are FSDP2 shards \(DTensors\): "
        r"patch first, then shard: .*",
        refusals["patch"],
    )
    assert refusals["recompose"].startswith(
        "recompose multiplies whole factors; the model's parameters are FSDP2 shards"
    )
    assert "pass save_strategy='no'" in refusals["checkpoints"]
    assert re.fullmatch(
        r"bert\.encoder\.layer\.0\.attention\.self\.query\.weight: the shard of process 0 "
        r"\(rows 0\.\.12 of dim 0\) splits head 1 \(8 rows per head\); shard this parameter along "
        r"dim 1 .* divides its 3 heads",
        refusals["head_split"],
    )


def test_deepspeed_with_fd_is_refused(monkeypatch, tmp_path):
    from transformers import Trainer

    from fnl_transformers.hf.trainer import FNLTrainer

    original = Trainer.create_accelerator_and_postprocess

    def with_deepspeed(self):
        original(self)
        self.is_deepspeed_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", with_deepspeed)
    with pytest.raises(
        ValueError,
        match=r"^FNLTrainer computes FD from whole or FSDP2-sharded parameters; DeepSpeed "
        r"flattens them: train with DDP \(torchrun\) or FSDP2",
    ):
        FNLTrainer(model=tiny_bert(), args=training_args(str(tmp_path)), train_dataset=MLMData())


def test_fsdp1_with_fd_is_refused(monkeypatch, tmp_path):
    """accelerate's FSDP plugin (GPU-only, so simulated here) at version 1 flattens the parameters."""
    import types

    from accelerate.state import AcceleratorState

    from fnl_transformers.hf.trainer import FNLTrainer

    plugin = types.SimpleNamespace(fsdp_version=1, activation_checkpointing=False, state_dict_type="FULL_STATE_DICT")
    monkeypatch.setattr(AcceleratorState, "fsdp_plugin", plugin, raising=False)
    with pytest.raises(
        ValueError,
        match=r"^FNLTrainer computes FD on FSDP2 \(DTensor\) shards; FSDP1 flattens the "
        r"parameters: pass fsdp_config=\{'version': 2\}$",
    ):
        FNLTrainer(model=tiny_bert(), args=training_args(str(tmp_path)), train_dataset=MLMData())
