"""Frobenius decay (FD): ``lambda / 2 * ||W||_F^2`` on the *product* ``W = A [M] B^T`` of each form.

Paper: Khodak et al., ICLR 2021, Definition 3.2 (FD) versus weight decay on the factors, whose minimum over
balanced factorizations is the nuclear norm, ``min (||A||_F^2 + ||B||_F^2) / 2 = ||A B^T||_*`` (the contrast the
paper draws next to Definition 3.2).

Everything is computed from small Gram matrices in float32, never the m x n product, unless the product is
the cheaper route (overcomplete factors, ``k > m n / (m + n)``); the formulas and their batched execution over
all forms of a model live in :mod:`fnl_transformers.core.batched`:

* ``||A M B^T||_F^2 = <A^T A, M (B^T B) M^T>``
* ``d/dA 1/2 ||W||^2 = A M (B^T B) M^T``, ``d/dB = B M^T (A^T A) M``, ``d/dM = (A^T A) M (B^T B)``

With grouped-query attention ``B`` has ``G`` heads shared by ``H / G`` query heads each. Model-level functions
(:func:`frobenius_penalty`, :func:`frobenius_penalty_by_kind`, :func:`fd_grads`, :func:`accumulate_fd_grads`)
run every form in grouped, batched calls; :func:`form_sq_norms` / :func:`form_grads` handle one bound form.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .batched import (
    cast,
    compute_dtype,
    expand_heads,
    gram,
    gram_grads,
    gram_sq_norms,
    model_plan,
    product_grads,
    product_terms,
    spec_plan,
    use_product,
)
from .forms import KINDS, BoundForm, FormSpec, iter_forms
from .settings import FDSpec, check_fd_coefficients
from .sharded import accumulate_sharded_fd_grads, is_dtensor
from .spectral import qr_core

__all__ = [
    "accumulate_fd_grads",
    "fd_grads",
    "form_diagnostics",
    "form_grads",
    "form_sq_norms",
    "frobenius_penalty",
    "frobenius_penalty_by_kind",
    "use_product",
]


def _bound(f: BoundForm):
    dtype = compute_dtype(f.A, f.B, f.M)
    return cast(f.A, dtype), cast(f.B, dtype), None if f.M is None else cast(f.M, dtype)


class _GramSqNorms(torch.autograd.Function):
    """Per-head ``||A M B^T||_F^2 = <A^T A, M B^T B M^T>`` of one form, backward by :func:`gram_grads`."""

    @staticmethod
    def forward(ctx, A, B, M):
        Ga, Gb = gram(A), gram(B)
        ctx.save_for_backward(A, B, M, Ga, Gb)
        return gram_sq_norms(Ga, expand_heads(Gb, A.shape[0]), M)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        A, B, M, Ga, Gb = ctx.saved_tensors
        dA, dB, dM = gram_grads(A, B, M, Ga, Gb, 2 * g, ctx.needs_input_grad)
        return dA, dB, None if dM is None else dM.sum(0)


def form_sq_norms(f: BoundForm) -> torch.Tensor:
    """Per-head ``||A_h M B_g(h)^T||_F^2`` (float32, differentiable), shape ``(H,)``."""
    A, B, M = _bound(f)
    if use_product(A.shape[1], B.shape[1], A.shape[2]):
        return product_terms(A, B, M)[0].pow(2).sum((1, 2))
    return _GramSqNorms.apply(A, B, M)


def form_grads(f: BoundForm) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of ``FD = 1/2 sum_h ||W_h||_F^2`` w.r.t. A, B (and M), in float32, shapes of A, B, M."""
    A, B, M = _bound(f)
    w = torch.ones(A.shape[0], dtype=A.dtype, device=A.device)
    with torch.no_grad():
        if use_product(A.shape[1], B.shape[1], A.shape[2]):
            W, AM = product_terms(A, B, M)
            dA, dB, dM = product_grads(A, B, M, W, AM, w)
        else:
            dA, dB, dM = gram_grads(A, B, M, gram(A), gram(B), w)
    return dA, dB, None if dM is None else dM.sum(0)


def _active(coeffs: Dict[str, float]) -> Tuple[str, ...]:
    return tuple(k for k in KINDS if coeffs[k] > 0)


def frobenius_penalty_by_kind(model: nn.Module, linear=0.0, embedding=0.0, qk=0.0, ov=0.0) -> Dict[str, torch.Tensor]:
    """``{kind: lambda_kind / 2 * sum_forms ||W_form||_F^2}`` for each kind with a nonzero coefficient; nonzero
    coefficients none of whose kinds ``model`` has (a penalty that is always 0) are one clear error.

    All forms of ``model`` go through one batched computation (:mod:`fnl_transformers.core.batched`: forms
    grouped by shape, grouping cached per model) and one autograd node with a closed-form backward."""
    coeffs = check_fd_coefficients(linear, embedding, qk, ov)
    active = _active(coeffs)
    plan, tensors = model_plan(model, active) if active else (None, [])
    if plan is None:
        if active:  # nonzero coefficients, none of whose kinds the model has: a penalty that is always 0
            spec = FDSpec(linear=coeffs["linear"], embedding=coeffs["embedding"], qk=coeffs["qk"], ov=coeffs["ov"])
            spec.check_present({form.kind for _, _, form, _ in iter_forms(model)})
        return {}
    sq = plan.sq_norms(tensors)  # ||W_f||_F^2 per form
    present = tuple(k for k in active if k in plan.kinds)
    per_kind = sq.new_zeros(len(present)).index_add(0, plan.kind_index(present), sq)
    scale = torch.tensor([coeffs[k] / 2 for k in present], dtype=sq.dtype, device=sq.device)
    values = (per_kind * scale).unbind()  # lambda/2 ||W||_F^2, Definition 3.2
    return dict(zip(present, values))


def frobenius_penalty(model: nn.Module, linear=0.0, embedding=0.0, qk=0.0, ov=0.0) -> torch.Tensor:
    """Differentiable ``sum_kind lambda_kind / 2 * sum_forms ||W_form||_F^2`` over every form of ``model``."""
    parts = frobenius_penalty_by_kind(model, linear, embedding, qk, ov)
    if not parts:
        p = next(model.parameters(), None)
        return torch.zeros((), dtype=torch.float32, device=None if p is None else p.device)
    return torch.stack(list(parts.values())).sum()


def _weights(plan, coeffs: Dict[str, float]) -> torch.Tensor:
    return torch.tensor([coeffs[k] for k in plan.kinds], dtype=plan.dtype, device=plan.device)


def accumulate_fd_grads(
    specs: Iterable[FormSpec],
    lookup,
    coeffs: Dict[str, float],
    out: Optional[Dict[int, torch.Tensor]] = None,
) -> Dict[int, torch.Tensor]:
    """``lambda_kind * dFD/dp`` for every parameter ``p`` of ``specs`` (float32; float64 for float64 ``p``),
    keyed by ``id(p)``.

    ``lookup(key)`` returns the parameter a spec names. Gradients of parameters shared by several forms
    (fused projections, tied factors) are summed. Buffers already in ``out`` receive the gradients in place
    (added by the matrix products themselves), others are created. All forms run in one batched computation
    (:func:`fnl_transformers.core.batched.spec_plan`, cached). Used by the optimizers for decoupled FD.

    Parameters that are DTensors (FSDP2 ``fully_shard``) go through
    :func:`fnl_transformers.core.sharded.accumulate_sharded_fd_grads`: local shards plus one all-reduce of k x k
    pieces, never a gathered factor (every process must then call this with the same specs).
    """
    out = {} if out is None else out
    active = [s for s in specs if coeffs.get(s.kind, 0.0)]
    if not active:
        return out
    if any(is_dtensor(lookup(k)) for s in active for k in s.keys()):
        return accumulate_sharded_fd_grads(active, lookup, coeffs, out)[1]
    plan, tensors = spec_plan(active, lookup)
    by_index = {i: out[id(t)] for i, t in enumerate(tensors) if id(t) in out}
    with torch.no_grad():
        plan.add_grads(tensors, _weights(plan, coeffs), by_index)
    for i, t in enumerate(tensors):
        out[id(t)] = by_index[i]
    return out


def fd_grads(model: nn.Module, linear=0.0, embedding=0.0, qk=0.0, ov=0.0) -> Dict[str, torch.Tensor]:
    """``{parameter_name: lambda * dFD/dparameter}`` for every factor parameter of ``model`` (float32)."""
    coeffs = check_fd_coefficients(linear, embedding, qk, ov)
    active = _active(coeffs)
    plan, tensors = model_plan(model, active) if active else (None, [])
    if plan is None:
        return {}
    by_index: Dict[int, torch.Tensor] = {}
    with torch.no_grad():
        plan.add_grads(tensors, _weights(plan, coeffs), by_index)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(tensors[i])]: g for i, g in by_index.items()}


@torch.no_grad()
def form_diagnostics(model: nn.Module, lr: Optional[float] = None) -> Dict[str, float]:
    """Per kind, means over forms (heads count separately) of: ``frobenius`` ``||W||_F``, ``nuclear``
    ``||W||_*``, ``wd_bound`` ``(||A||_F^2 + ||B||_F^2) / 2`` (an upper bound on the nuclear norm, paper
    Fig. 1; for deep forms ``A`` is ``U M``), and with ``lr`` the effective step size ``lr / ||W||_F^2``
    (paper Fig. 3). Returned as plain floats, keys ``"{kind}/{quantity}"``."""
    sums: Dict[str, List[torch.Tensor]] = {}
    for _, _, spec, f in iter_forms(model):
        A, B, M = _bound(f)
        if M is not None:
            A = A @ M
        B = expand_heads(B, A.shape[0])
        fro2 = form_sq_norms(f)
        core, _, _ = qr_core(A, B, with_q=False)
        nuc = torch.linalg.svdvals(core).sum(-1)  # ||Qa C Qb^T||_* = ||C||_*
        bound = (A.pow(2).sum((1, 2)) + B.pow(2).sum((1, 2))) / 2
        stats = {"frobenius": fro2.sqrt(), "nuclear": nuc, "wd_bound": bound}
        if lr is not None:
            stats["eff_step"] = lr / fro2.clamp_min(torch.finfo(torch.float32).tiny)
        for q, v in stats.items():
            sums.setdefault(f"{spec.kind}/{q}", []).append(v)
    return {k: float(torch.cat(v).mean()) for k, v in sums.items()}
