"""Item 5. Optimizer step time on the parameters of a BERT-base-sized model (default ``BertConfig``).

``FLAMBe`` with FD on the OV forms (the paper's setting) and on QK + OV, vs ``Lamb`` (same code without FD),
and ``Lamb`` vs torch-optimizer's ``Lamb``; fixed random gradients, all optimizers alternating step by step.
Target: ``FLAMBe`` (OV) at most 1.15x the time of ``Lamb``.
"""
from __future__ import annotations

import torch

from fnl_transformers.optim import FLAMBe, Lamb, param_groups

from .common import bert_model, main, median_times, row, skipped

ITEM, QUESTION = 5, "Optimizer step: FLAMBe vs Lamb vs torch-optimizer Lamb"


def run(quick: bool):
    model = bert_model(quick)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opts = {
        "Lamb": Lamb(param_groups(model, weight_decay=0.01), lr=1e-4),
        "FLAMBe OV": FLAMBe(param_groups(model, fd_ov=1e-2, weight_decay=0.01), lr=1e-4),
        "FLAMBe QK+OV": FLAMBe(param_groups(model, fd_qk=1e-2, fd_ov=1e-2, weight_decay=0.01), lr=1e-4),
    }
    try:
        import torch_optimizer

        opts["torch-optimizer Lamb"] = torch_optimizer.Lamb(param_groups(model, weight_decay=0.01), lr=1e-4,
                                                            clamp_value=1e4)
    except ImportError:
        pass
    t = median_times({k: o.step for k, o in opts.items()}, repeats=2 if quick else 5)
    n = sum(p.numel() for p in model.parameters())
    size = f"{n / 1e6:.1f}M parameters"
    rows = [
        row(f"FLAMBe, FD on OV ({size})", "Lamb", t["Lamb"], "FLAMBe", t["FLAMBe OV"],
            t["FLAMBe OV"] / t["Lamb"], "ours / baseline (slowdown)", "<= 1.15x", t["FLAMBe OV"] / t["Lamb"] <= 1.15),
        row(f"FLAMBe, FD on QK and OV ({size})", "Lamb", t["Lamb"], "FLAMBe", t["FLAMBe QK+OV"],
            t["FLAMBe QK+OV"] / t["Lamb"], "ours / baseline (slowdown)", "report", None),
    ]
    if "torch-optimizer Lamb" in t:
        rows.append(row(f"Lamb ({size})", "torch-optimizer Lamb", t["torch-optimizer Lamb"], "Lamb", t["Lamb"],
                        t["Lamb"] / t["torch-optimizer Lamb"], "ours / baseline (slowdown)", "report", None))
    else:
        rows.append(skipped("Lamb vs torch-optimizer Lamb", "report", "torch-optimizer not installed"))
    return rows


if __name__ == "__main__":
    main(ITEM, QUESTION, run)
