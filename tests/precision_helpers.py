"""Shared references of the mixed-precision and GPU tests (no pytest import: plain functions).

* ``dense_fd64(model, coeffs)``: the Frobenius decay value per kind and its gradient per parameter, from the
  *dense* products ``W_h = A_h [M] B_h^T`` of every form, in float64 on the CPU, by autograd (paper
  Definition 3.2): the reference the Gram-matrix route of the core must match.
* ``rel_err(a, b)``: ``||a - b||_F / ||b||_F`` in float64.
* ``param_distance(a, b, start)``: ``||a - b|| / ||b - start||`` over all parameters together (how far two runs
  ended apart, relative to how far the reference travelled).
* ``mp_trainer(...)``: an ``FNLTrainer`` on the tiny BERT of ``hf_trainer_helpers`` in float32, bf16 or fp16, with
  one of the optimizer ``SETUPS``; ``AFTER_N`` holds the tolerances of ``N_STEPS`` updates against float32.
"""

from __future__ import annotations

import copy
from typing import Dict, Tuple

import torch
from torch import nn

from fnl_transformers.core import iter_forms


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def dense_fd64(model: nn.Module, coeffs: Dict[str, float]) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
    """``({kind: lambda/2 sum ||W||_F^2}, {param_name: d total / d param})`` in float64 via dense products."""
    ref = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    for p in ref.parameters():
        p.grad = None
    values: Dict[str, torch.Tensor] = {}
    for _, _, spec, f in iter_forms(ref, tuple(k for k, v in coeffs.items() if v)):
        A = f.A if f.M is None else f.A @ f.M
        B = f.B.repeat_interleave(A.shape[0] // f.B.shape[0], dim=0)  # grouped heads: head h uses group h // (H/G)
        W = A @ B.transpose(1, 2)  # H x m x n, the dense per-head products
        term = W.pow(2).sum() * (coeffs[spec.kind] / 2)
        values[spec.kind] = values[spec.kind] + term if spec.kind in values else term
    total = torch.stack(list(values.values())).sum()
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in values.items()}, grads


def flat(params: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params[n].detach().double().cpu().flatten() for n in sorted(params)])


def param_distance(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], start: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() == start.keys()
    moved = float((flat(b) - flat(start)).norm())
    assert moved > 0, "the reference run did not move the parameters"
    return float((flat(a) - flat(b)).norm()) / moved


# FNLTrainer setups: trainer arguments and the FD coefficient of every kind (large enough that FD visibly moves the
# weights within N_STEPS updates: without FD each run ends at least 2.5 tolerances away)
SETUPS = {
    "coupled": (dict(fd="coupled"), 0.05),  # Trainer's AdamW, FD in the loss
    "adamwfd": (dict(fd="decoupled", fd_optimizer="adamwfd"), 30.0),
    "flambe": (dict(fd="decoupled", fd_optimizer="flambe"), 5.0),
}
N_STEPS = 30
# param_distance to the float32 run after N_STEPS updates. Adam amplifies the rounding of near-zero gradients
# (measured on CPU: bf16 0.07-0.09, fp16 0.005-0.014); LAMB's trust ratio does not (bf16 0.005, fp16 4e-4)
AFTER_N = {("bf16", "adam"): 0.2, ("fp16", "adam"): 0.05, ("bf16", "lamb"): 0.02, ("fp16", "lamb"): 0.005}
AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def after_n_tolerance(precision: str, setup: str) -> float:
    return AFTER_N[(precision, "lamb" if setup == "flambe" else "adam")]


def fd_coeffs(value: float) -> Dict[str, float]:
    from hf_trainer_helpers import FD

    return {kind: value for kind in FD}


class AutocastProbe:
    """Records the dtype of a projection's output: float32 without autocast, bf16/fp16 under it."""

    def __init__(self, model):
        self.dtypes = set()
        layer = model.bert.encoder.layer[0].attention.self.query
        layer.register_forward_hook(lambda mod, inp, out: self.dtypes.add(out.dtype))


def mp_trainer(
    out_dir: str, precision: str, setup: str, coef: float, steps: int, device: str = "cpu", data=None, **args_kw
):
    """FNLTrainer on ``tiny_bert`` (sequential batches, lr 1e-2, Adam eps 1e-6) with ``trainer.probe``."""
    from fnl_transformers.hf.trainer import FNLTrainer

    from hf_trainer_helpers import MLMData, tiny_bert, training_args

    model = tiny_bert()
    mp = {"bf16": dict(bf16=True), "fp16": dict(fp16=True), "fp32": {}}[precision]
    base = dict(
        max_steps=steps,
        learning_rate=1e-2,
        adam_epsilon=1e-6,
        train_sampling_strategy="sequential",
        logging_steps=1,
        use_cpu=device == "cpu",
    )
    base.update(args_kw)
    args = training_args(out_dir, **mp, **base)
    trainer = FNLTrainer(
        model=model,
        args=args,
        train_dataset=data if data is not None else MLMData(),
        fnl_config=fd_coeffs(coef),
        **SETUPS[setup][0],
    )
    trainer.probe = AutocastProbe(model)
    return trainer
