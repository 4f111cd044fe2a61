"""Worker for tests/test_hf_trainer_fsdp.py: train the tiny factorized BERT with FNLTrainer and save the final
parameters (process 0). Run alone (one process, whole parameters) or under ``torchrun --nproc_per_node 2`` (gloo,
CPU), where the patched model is sharded with FSDP2 ``fully_shard`` (each encoder layer, then the root; every
parameter along dim 0) before it is handed to ``FNLTrainer``.

Four runs in one launch: ``coupled`` (FD in the loss, AdamW), ``flambe`` and ``adamwfd`` (decoupled FD in the
optimizer ``FNLTrainer`` builds), ``flambe_clip`` (a FLAMBe with ``max_grad_norm`` passed in ``optimizers``); with
``--refusals``, then the refusals (:func:`refusals`).
``--batch``/``--accum`` are per process. While FD runs, every torch.distributed collective other than
``all_reduce`` raises; each FD call's collectives (from its ``CommLog``) are saved with the results.
"""

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fnl_transformers.core.sharded as sharded  # noqa: E402
from fnl_transformers.hf.trainer import FNLTrainer  # noqa: E402

from distributed_helpers import forbid_collectives  # noqa: E402
from hf_trainer_helpers import FD, MLMData, quiet, tiny_bert, training_args  # noqa: E402

RUNS = {
    "coupled": dict(fd="coupled", optim="adamw_torch"),
    "flambe": dict(fd="decoupled", fd_optimizer="flambe"),
    "adamwfd": dict(fd="decoupled", fd_optimizer="adamwfd"),
    "flambe_clip": dict(fd="decoupled", own_optimizer=True),  # FLAMBe(param_groups(...), max_grad_norm=0.5) passed in
}


def _own_optimizer(model):
    """FLAMBe built by the user (on the sharded parameters when sharded), with global gradient pre-normalization
    (the gradient norm of these runs is about 2: it acts)."""
    from fnl_transformers.optim import FLAMBe, param_groups

    groups = param_groups(model, fd_linear=FD["linear"], fd_qk=FD["qk"], fd_ov=FD["ov"], weight_decay=0.1)
    return FLAMBe(groups, lr=1e-2, eps=1e-6, max_grad_norm=0.5)


CALLS = []  # per sharded FD call: its coefficients, CommLog calls and the collectives torch saw


def _watch_fd():
    """Wrap core.sharded.sharded_fd: no collective but its all-reduce, and a record of what it sent."""
    original = sharded.sharded_fd

    def watched(specs, lookup, coeffs, comm):
        from torch.distributed.tensor.debug import CommDebugMode

        with forbid_collectives("FD under FSDP"), CommDebugMode() as mode:  # mode: also DTensor redistributions
            out = original(specs, lookup, coeffs, comm)
        counts = {str(op): n for op, n in mode.get_comm_counts().items()}
        CALLS.append(
            dict(
                coeffs=dict(coeffs),
                log=[list(c) for c in comm.log.calls],
                ops=counts,
                dry=isinstance(comm, sharded.DryRunComm),
            )
        )  # FNLTrainer's check of the layouts
        return out

    sharded.sharded_fd = watched


def _shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _message(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def refusals() -> dict:
    """What cannot work on a sharded model, each refused with one line: patching or recomposing it, Trainer
    checkpoints of it, and a sharding that splits a head (BERT with 3 heads of 8 rows: 12 rows per process)."""
    from fnl_transformers.hf import recompose
    from fnl_transformers.hf.apply import patch_model
    from fnl_transformers.hf.config import FNLConfig

    sharded_model = _shard(tiny_bert())
    out = dict(
        patch=_message(lambda: patch_model(sharded_model, FNLConfig(rank_scale=0.5))),
        recompose=_message(lambda: recompose(sharded_model)),
        checkpoints=_message(
            lambda: FNLTrainer(
                model=sharded_model,
                args=training_args(tempfile.mkdtemp(), save_strategy="steps", ddp_backend="gloo"),
                train_dataset=MLMData(),
            )
        ),
        head_split=_message(
            lambda: FNLTrainer(
                model=_shard(tiny_bert(heads=3)),
                args=training_args(tempfile.mkdtemp(), ddp_backend="gloo"),
                train_dataset=MLMData(),
            )
        ),
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="file for {run: {name: tensor}} (written by process 0)")
    parser.add_argument("--batch", type=int, required=True, help="per-process batch size")
    parser.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--refusals", action="store_true", help="with 2 processes: also record the refusals")
    args = parser.parse_args()
    quiet()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
        _watch_fd()
    results = {}
    for name, run in RUNS.items():
        CALLS.clear()
        model = tiny_bert()
        if world > 1:
            model = _shard(model)
        targs = training_args(
            tempfile.mkdtemp(),
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accum,
            max_steps=args.steps,
            optim=run.get("optim", "adamw_torch"),
            learning_rate=1e-2,
            adam_epsilon=1e-6,
            logging_steps=args.steps,
            **({"ddp_backend": "gloo"} if world > 1 else {}),
        )
        optimizers = (_own_optimizer(model), None) if run.get("own_optimizer") else (None, None)
        trainer = FNLTrainer(
            model=model,
            args=targs,
            train_dataset=MLMData(),
            fd=run["fd"],
            fd_optimizer=run.get("fd_optimizer", "adamwfd"),
            optimizers=optimizers,
        )
        trainer.train()
        logged = [h for h in trainer.state.log_history if "loss" in h][-1]
        full = {
            n: (p.full_tensor() if sharded.is_dtensor(p) else p).detach().clone() for n, p in model.named_parameters()
        }
        results[name] = full
        results[name + "/loss"] = torch.tensor(logged["loss"])
        results[name + "/fd"] = torch.tensor([logged[f"fnl/{k}/fd"] for k in sorted(FD)])
        results[name + "/dtensors"] = torch.tensor(sum(sharded.is_dtensor(p) for p in model.parameters()))
        results[name + "/fd_calls"] = list(CALLS)
    if world > 1 and args.refusals:
        results["refusals"] = refusals()
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, args.out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
