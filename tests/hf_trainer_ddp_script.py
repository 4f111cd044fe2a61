"""Worker for tests/test_hf_trainer_ddp.py: train the tiny factorized BERT with FNLTrainer and save the final
parameters (process 0). Run alone (one process) or under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Two runs in one launch: ``coupled`` (FD in the loss, AdamW) and ``flambe`` (decoupled FD through FLAMBe).
``--batch``/``--accum`` are per process, so 2 processes x batch 2 is the global batch of 1 process x batch 4.
"""

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fnl_transformers.hf.trainer import FNLTrainer  # noqa: E402

from hf_trainer_helpers import MLMData, quiet, tiny_bert, training_args  # noqa: E402

RUNS = {
    "coupled": dict(fd="coupled", optim="adamw_torch"),
    "flambe": dict(fd="decoupled", fd_optimizer="flambe"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="file for {run: {name: tensor}} (written by process 0)")
    parser.add_argument("--batch", type=int, required=True, help="per-process batch size")
    parser.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    quiet()
    results = {}
    for name, run in RUNS.items():
        model = tiny_bert()
        targs = training_args(
            tempfile.mkdtemp(),
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accum,
            max_steps=args.steps,
            optim=run.get("optim", "adamw_torch"),
            learning_rate=1e-2,
            adam_epsilon=1e-6,
            logging_steps=args.steps,
            ddp_find_unused_parameters=False,
            **({"ddp_backend": "gloo"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}),
        )
        trainer = FNLTrainer(
            model=model,
            args=targs,
            train_dataset=MLMData(),
            fd=run["fd"],
            fd_optimizer=run.get("fd_optimizer", "adamwfd"),
        )
        trainer.train()
        results[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
        results[name + "/world_size"] = torch.tensor(targs.world_size)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, args.out)


if __name__ == "__main__":
    main()
