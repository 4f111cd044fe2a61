"""Shared references of the mixed-precision and GPU tests (no pytest import: plain functions).

* ``dense_fd64(model, coeffs)``: the Frobenius decay value per kind and its gradient per parameter, from the
  *dense* products ``W_h = A_h [M] B_h^T`` of every form, in float64 on the CPU, by autograd (paper
  Definition 3.2): the reference the Gram-matrix route of the core must match.
* ``rel_err(a, b)``: ``||a - b||_F / ||b||_F`` in float64.
* ``param_distance(a, b, start)``: ``||a - b|| / ||b - start||`` over all parameters together (how far two runs
  ended apart, relative to how far the reference travelled).
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
