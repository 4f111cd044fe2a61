"""Frobenius decay (FD): ``lambda / 2 * ||W||_F^2`` on the *product* ``W = A [M] B^T`` of each form.

Paper: Khodak et al., ICLR 2021, Sec. 3.2, Eq. (3) (FD) versus weight decay on the factors, whose minimum over
balanced factorizations is the nuclear norm, ``min (||A||_F^2 + ||B||_F^2) / 2 = ||A B^T||_*`` (Sec. 3.2).

Everything is computed from small Gram matrices in float32, never the m x n product, unless the product is
the cheaper route (overcomplete factors, ``k > m n / (m + n)``):

* ``||A M B^T||_F^2 = <A^T A, M (B^T B) M^T>``
* ``d/dA 1/2 ||W||^2 = A M (B^T B) M^T``, ``d/dB = B M^T (A^T A) M``, ``d/dM = (A^T A) M (B^T B)``

With grouped-query attention ``B`` has ``G`` heads shared by ``H / G`` query heads each.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .forms import KINDS, BoundForm, FormSpec, iter_forms, module_lookup
from .settings import FDSpec, check_fd_coefficients


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _gram(X: torch.Tensor) -> torch.Tensor:
    X = _f32(X)
    return X.transpose(-1, -2) @ X  # X^T X, k x k per head


def _expand(T: torch.Tensor, H: int) -> torch.Tensor:
    """Repeat per-group tensors (G x ...) to per-head (H x ...): head h uses group h // (H / G)."""
    G = T.shape[0]
    return T if G == H else T.repeat_interleave(H // G, dim=0)


def _group_sum(T: torch.Tensor, G: int) -> torch.Tensor:
    """Sum per-head tensors (H x ...) over the heads of each group -> (G x ...)."""
    H = T.shape[0]
    return T if G == H else T.reshape(G, H // G, *T.shape[1:]).sum(1)


def use_product(m: int, n: int, k: int) -> bool:
    """The dense product (cost m n k) beats the Grams (cost (m + n) k^2) when ``k > m n / (m + n)``."""
    return k * (m + n) > m * n


def _product(f: BoundForm) -> torch.Tensor:
    A = _f32(f.A)
    if f.M is not None:
        A = A @ _f32(f.M)
    return A @ _expand(_f32(f.B), A.shape[0]).transpose(1, 2)  # W_h = A_h M B_g^T


def _times_sym(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``A_h X_h`` for symmetric ``X_h``, computed in ``A``'s memory layout: for a transposed view (q/k/v rows of
    an ``nn.Linear``) as ``(X A^T)^T``, so the result lands in the parameter's layout without a strided copy."""
    At = A.transpose(1, 2)
    if A.is_contiguous() or not At.is_contiguous():
        return A @ X
    return (X @ At).transpose(1, 2)


class _GramSqNorms(torch.autograd.Function):
    """Per-head ``||A M B^T||_F^2 = <A^T A, M B^T B M^T>`` with a closed-form backward: one matmul per factor
    (``d/dA = 2 A (M B^T B M^T)``, ``d/dB = 2 B (M^T A^T A M)``, ``d/dM = 2 A^T A M B^T B``) instead of the two
    that autograd spends on each Gram (paper Eq. (3), computed without the m x n product)."""

    @staticmethod
    def forward(ctx, A, B, M):
        Ga = _gram(A)
        Gb = _expand(_gram(B), A.shape[0])
        GbM = Gb if M is None else M @ Gb @ M.t()
        ctx.save_for_backward(A, B, M, Ga, Gb, GbM)
        return (Ga * GbM).sum((1, 2))  # <A^T A, M B^T B M^T>, both symmetric

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        A, B, M, Ga, Gb, GbM = ctx.saved_tensors
        g2 = 2 * g.view(-1, 1, 1)
        dA = _times_sym(A, g2 * GbM) if ctx.needs_input_grad[0] else None
        dB = dM = None
        if ctx.needs_input_grad[1]:
            GaM = Ga if M is None else M.t() @ Ga @ M
            dB = _times_sym(B, _group_sum(g2 * GaM, B.shape[0]))
        if M is not None and ctx.needs_input_grad[2]:
            dM = (g2 * (Ga @ M @ Gb)).sum(0)
        return dA, dB, dM


def form_sq_norms(f: BoundForm) -> torch.Tensor:
    """Per-head ``||A_h M B_g(h)^T||_F^2`` (float32, differentiable), shape ``(H,)``."""
    H, m, k = f.A.shape
    if use_product(m, f.B.shape[1], k):
        return _product(f).pow(2).sum((1, 2))
    return _GramSqNorms.apply(_f32(f.A), _f32(f.B), None if f.M is None else _f32(f.M))


def form_grads(f: BoundForm) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of ``FD = 1/2 sum_h ||W_h||_F^2`` w.r.t. A, B (and M), in float32, shapes of A, B, M."""
    H, m, k = f.A.shape
    G, n = f.B.shape[0], f.B.shape[1]
    A, B = _f32(f.A), _f32(f.B)
    M = None if f.M is None else _f32(f.M)
    if use_product(m, n, k):
        W = _product(f)  # H x m x n
        Bh = _expand(B, H)
        AM = A if M is None else A @ M
        dA = W @ Bh if M is None else W @ Bh @ M.t()  # W B M^T
        dB = _group_sum(W.transpose(1, 2) @ AM, G)  # sum_h W_h^T A_h M
        dM = None if M is None else (A.transpose(1, 2) @ W @ Bh).sum(0)  # A^T W B
        return dA, dB, dM
    Ga, Gb = _gram(A), _gram(B)
    Gbh = _expand(Gb, H)
    if M is None:
        return _times_sym(A, Gbh), _times_sym(B, _group_sum(Ga, G)), None  # U (V^T V), V (U^T U)
    dA = _times_sym(A, M @ Gbh @ M.t())  # A M (B^T B) M^T
    dB = _times_sym(B, M.t() @ _group_sum(Ga, G) @ M)  # B M^T (A^T A) M
    dM = (Ga @ M @ Gbh).sum(0)  # (A^T A) M (B^T B)
    return dA, dB, dM


def frobenius_penalty_by_kind(model: nn.Module, linear=0.0, embedding=0.0, qk=0.0, ov=0.0) -> Dict[str, torch.Tensor]:
    """``{kind: lambda_kind / 2 * sum_forms ||W_form||_F^2}`` for each kind with a nonzero coefficient; nonzero
    coefficients none of whose kinds ``model`` has (a penalty that is always 0) are one clear error."""
    coeffs = check_fd_coefficients(linear, embedding, qk, ov)
    active = tuple(k for k in KINDS if coeffs[k] > 0)
    if active and next(iter_forms(model, active), None) is None:  # nothing to decay
        FDSpec(**coeffs).check_present({spec.kind for _, _, spec, _ in iter_forms(model)})
    out: Dict[str, torch.Tensor] = {}
    for _, _, spec, bound in iter_forms(model, active):
        value = form_sq_norms(bound).sum() * (coeffs[spec.kind] / 2)  # lambda/2 ||W||_F^2, Eq. (3)
        out[spec.kind] = out[spec.kind] + value if spec.kind in out else value
    return out


def frobenius_penalty(model: nn.Module, linear=0.0, embedding=0.0, qk=0.0, ov=0.0) -> torch.Tensor:
    """Differentiable ``sum_kind lambda_kind / 2 * sum_forms ||W_form||_F^2`` over every form of ``model``."""
    parts = frobenius_penalty_by_kind(model, linear, embedding, qk, ov)
    if not parts:
        p = next(model.parameters(), None)
        return torch.zeros((), dtype=torch.float32, device=None if p is None else p.device)
    return torch.stack(list(parts.values())).sum()


def accumulate_fd_grads(
    specs: Iterable[FormSpec],
    lookup,
    coeffs: Dict[str, float],
    out: Optional[Dict[int, torch.Tensor]] = None,
) -> Dict[int, torch.Tensor]:
    """``lambda_kind * dFD/dp`` for every parameter ``p`` of ``specs`` (float32; float64 for float64 ``p``),
    keyed by ``id(p)``.

    ``lookup(key)`` returns the parameter a spec names. Gradients of parameters shared by several forms
    (fused projections, tied factors) are summed. Used by the optimizers for decoupled FD.
    """
    out = {} if out is None else out
    for spec in specs:
        lam = coeffs.get(spec.kind, 0.0)
        if not lam:
            continue
        with torch.no_grad():
            bound = spec.bind(lookup)
            dA, dB, dM = form_grads(bound)
            for view, grad in ((spec.a, dA), (spec.b, dB)):
                p = lookup(view.key)
                buf = out.setdefault(id(p), torch.zeros_like(p, dtype=_f32(p).dtype))
                view.view(buf).add_(grad, alpha=lam)  # writes through the view into buf
            if dM is not None:
                p = lookup(spec.m)
                buf = out.setdefault(id(p), torch.zeros_like(p, dtype=_f32(p).dtype))
                buf.add_(dM, alpha=lam)
    return out


def fd_grads(model: nn.Module, linear=0.0, embedding=0.0, qk=0.0, ov=0.0) -> Dict[str, torch.Tensor]:
    """``{parameter_name: lambda * dFD/dparameter}`` for every factor parameter of ``model`` (float32)."""
    coeffs = check_fd_coefficients(linear, embedding, qk, ov)
    by_id: Dict[int, torch.Tensor] = {}
    for _, module, spec, _ in iter_forms(model):
        accumulate_fd_grads([spec], module_lookup(module), coeffs, by_id)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[i]: g for i, g in by_id.items()}


@torch.no_grad()
def form_diagnostics(model: nn.Module, lr: Optional[float] = None) -> Dict[str, float]:
    """Per kind, means over forms (heads count separately) of: ``frobenius`` ``||W||_F``, ``nuclear``
    ``||W||_*``, ``wd_bound`` ``(||A||_F^2 + ||B||_F^2) / 2`` (an upper bound on the nuclear norm, paper
    Fig. 1; for deep forms ``A`` is ``U M``), and with ``lr`` the effective step size ``lr / ||W||_F^2``
    (paper Fig. 3). Returned as plain floats, keys ``"{kind}/{quantity}"``."""
    sums: Dict[str, List[torch.Tensor]] = {}
    for _, _, spec, f in iter_forms(model):
        A = _f32(f.A) if f.M is None else _f32(f.A) @ _f32(f.M)
        B = _expand(_f32(f.B), A.shape[0])
        fro2 = form_sq_norms(f)
        Qa, Ra = torch.linalg.qr(A)
        Qb, Rb = torch.linalg.qr(B)
        nuc = torch.linalg.svdvals(Ra @ Rb.transpose(1, 2)).sum(-1)  # ||Qa Ra Rb^T Qb^T||_* = ||Ra Rb^T||_*
        bound = (A.pow(2).sum((1, 2)) + B.pow(2).sum((1, 2))) / 2
        stats = {"frobenius": fro2.sqrt(), "nuclear": nuc, "wd_bound": bound}
        if lr is not None:
            stats["eff_step"] = lr / fro2.clamp_min(torch.finfo(torch.float32).tiny)
        for q, v in stats.items():
            sums.setdefault(f"{spec.kind}/{q}", []).append(v)
    return {k: float(torch.cat(v).mean()) for k, v in sums.items()}
