"""Item 7. FD communication under FSDP2: bytes per update next to the gradient reduce-scatter, counted from the
collectives the code issues (no formula).

* **Measured**: BERT-base (``BertForMaskedLM(BertConfig())``, 110M parameters; ``--quick``: a 2-layer, 64-wide
  BERT) with the QK and OV forms registered (``patch_model(FNLConfig(fd_qk=.., fd_ov=..))``), sharded with FSDP2
  ``fully_shard`` (each encoder layer, then the root; FSDP2's default dim-0 placement) on 2 gloo processes. One
  update: FD from the local shards (:func:`fnl_transformers.core.sharded.model_sharded_fd`, what ``FNLTrainer``
  runs), its bytes from the ``CommLog`` of its ``Comm``; then forward and backward of a batch, FSDP2's gradient
  reduce-scatters counted by wrapping ``torch.distributed.reduce_scatter_single`` (the input each process
  contributes, per update). While FD runs, torch's ``CommDebugMode`` must see exactly one all-reduce (no
  all-gather: no factor is materialized), and the bytes must equal the dry run's count (``fd_comm_log``).
* **Dry run** (:func:`fnl_transformers.core.sharded.comm_table`, the README's "Scaling out" table): BERT-base at 4
  processes (default placement) and 8 processes (q/k/v along dim 1), the same code on meta tensors, next to 4 bytes
  per parameter of ``BertModel(BertConfig())`` (built on the meta device): the gradient all-reduce / reduce-scatter
  input of one update.

Target: FD's all-reduce at most 1% of the gradient's bytes for BERT-base under FSDP2's default placement.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from typing import List

import torch

from .common import main, row

ITEM, QUESTION = 7, "FD communication under FSDP2 (bytes per update)"
FD = {"qk": 1e-4, "ov": 1e-4}


def _config(quick: bool):
    from transformers import BertConfig

    if quick:
        return BertConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=32,
        )
    return BertConfig()


def _worker(rank: int, world: int, port: int, out: str, quick: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode
    from transformers import BertForMaskedLM
    from transformers.utils import logging

    from fnl_transformers.core.sharded import Comm, model_sharded_fd
    from fnl_transformers.hf import FNLConfig, patch_model

    logging.set_verbosity_error()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = _config(quick)
        model = patch_model(BertForMaskedLM(cfg), FNLConfig(fd_qk=FD["qk"], fd_ov=FD["ov"]))
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

        scattered: List[int] = []
        original = dist.reduce_scatter_single

        def counted(output, input, *args, **kwargs):
            scattered.append(input.numel() * input.element_size())
            return original(output, input, *args, **kwargs)

        dist.reduce_scatter_single = counted
        try:
            comm = Comm()
            with CommDebugMode() as mode:
                model_sharded_fd(model, FD, comm)
            fd_ops = {str(op): n for op, n in mode.get_comm_counts().items()}
            g = torch.Generator().manual_seed(rank)
            ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
        finally:
            dist.reduce_scatter_single = original
        if rank == 0:
            with open(out, "w") as f:
                json.dump(
                    dict(
                        fd_calls=[list(c) for c in comm.log.calls],
                        fd_bytes=comm.log.bytes,
                        fd_ops=fd_ops,
                        scatter_calls=len(scattered),
                        scatter_bytes=sum(scattered),
                        params=sum(p.numel() for p in model.parameters()),
                    ),
                    f,
                )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measured(quick: bool) -> dict:
    """One update on 2 gloo processes (see the module docstring); the dry run's count of the same model."""
    import torch.multiprocessing as mp
    from transformers import BertForMaskedLM

    from fnl_transformers.core.sharded import fd_comm_log
    from fnl_transformers.hf import FNLConfig, patch_model

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(_worker, args=(2, _free_port(), out, quick), nprocs=2, join=True)
        with open(out) as f:
            res = json.load(f)
    torch.manual_seed(0)
    with torch.device("meta"):
        ref = BertForMaskedLM(_config(quick))
    res["dry_bytes"] = fd_comm_log(patch_model(ref, FNLConfig(fd_qk=FD["qk"], fd_ov=FD["ov"])), FD, 2).bytes
    return res


def run(quick: bool) -> List[dict]:
    from transformers import BertConfig, BertModel

    from fnl_transformers.core.sharded import comm_table

    rows = []
    m = measured(quick)
    name = "BERT (2 layers, 64 wide; quick)" if quick else "BERT-base MLM (12 layers, 12 heads x 64)"
    ok = m["fd_bytes"] == m["dry_bytes"] and m["fd_ops"] == {"c10d.allreduce_": 1} and len(m["fd_calls"]) == 1
    share = 100 * m["fd_bytes"] / m["scatter_bytes"]
    rows.append(
        row(
            f"{name}, FD on QK + OV, FSDP2 default placement, 2 gloo processes, measured: FD {len(m['fd_calls'])} "
            f"all-reduce(s) (torch saw {m['fd_ops']}; dry run {m['dry_bytes']:,} bytes) vs {m['scatter_calls']} "
            f"gradient reduce-scatters of {m['params']:,} parameters",
            f"gradient reduce-scatter input per process: {m['scatter_bytes']:,} bytes",
            None,
            f"FD all-reduce: {m['fd_bytes']:,} bytes",
            None,
            share,
            "FD bytes / gradient bytes, %",
            "<= 1% of the gradient's bytes, one all-reduce, equal to the dry run",
            ok and share <= 1.0,
            fd_bytes=m["fd_bytes"],
            gradient_bytes=m["scatter_bytes"],
            dry_bytes=m["dry_bytes"],
            fd_ops=m["fd_ops"],
        )
    )
    with torch.device("meta"):
        grad = 4 * sum(p.numel() for p in BertModel(BertConfig()).parameters())
    for r in comm_table():
        if not r["model"].startswith("BERT"):
            continue
        default = "default" in r["sharding"]
        rows.append(
            row(
                f"{r['model']}, {r['sharding']}, dry run of the same code on meta tensors ({r['calls']} all-reduce)",
                f"gradient all-reduce / reduce-scatter, 4 bytes x {grad // 4:,} parameters: {grad:,} bytes",
                None,
                f"FD all-reduce: {r['bytes']:,} bytes",
                None,
                100 * r["bytes"] / grad,
                "FD bytes / gradient bytes, %",
                "<= 1%" if default else "report",
                (r["bytes"] <= grad / 100) if default else None,
                fd_bytes=r["bytes"],
                gradient_bytes=grad,
            )
        )
    return rows


if __name__ == "__main__":
    main(ITEM, QUESTION, run)
