"""LAMB (You et al., 2020) and FLAMBe: LAMB with decoupled Frobenius decay (Khodak et al., ICLR 2021, Sec. 6
and Table 4).

Update for each parameter tensor ``w`` with gradient ``g`` at step ``t`` (NVIDIA's BERT recipe, "NVLAMB"):

* optional global pre-normalization: ``g <- g / max(1, ||G||_2 / max_grad_norm)``, ``G`` all gradients of
  the optimizer together (apex ``FusedLAMB``'s ``max_grad_norm``);
* ``m = beta1 m + (1 - beta1) g``, ``v = beta2 v + (1 - beta2) g^2``;
* ``m_hat = m / (1 - beta1^t)``, ``v_hat = v / (1 - beta2^t)`` (``bias_correction=False``: no division);
* ``r = m_hat / (sqrt(v_hat) + eps) + d`` where the decay term ``d`` is ``weight_decay * w`` (LAMB) or, in
  FLAMBe, for factors of a factorized form, ``lambda_kind * dFD/dw`` with ``FD = 1/2 ||W_form||_F^2``
  (paper Definition 3.2; for ``U`` in ``W = U V^T`` that is ``U (V^T V)``);
* trust ratio ``q = ||w|| / ||r||``, **and q = 1 when either norm is 0** (a zero-initialized tensor, or a zero
  update); with ``trust_clip``, ``q = min(q, trust_clip)``;
* ``w <- w - lr * q * r``.

Differences from other LAMBs, on purpose:

* The trust ratio is applied to every tensor, including those without decay (biases, LayerNorm): apex
  ``FusedLAMB`` skips it for groups with ``weight_decay == 0`` unless ``use_nvlamb=True``; torch-optimizer's
  ``Lamb`` always applies it (but clamps ``||w||`` to ``clamp_value`` = 10 by default; no clamp here).
* Decay is decoupled (added to the update inside the trust ratio, AdamW style), never added to the gradient.
* ``step`` counts per parameter (a tensor without gradient does not advance), as in torch-optimizer.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ._fd import GroupForms, check_number, group_forms
from .base import FDOptimizer, working_copy, write_back


def lamb_update(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    steps: List[int],
    fd: Optional[GroupForms] = None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    trust_clip: Optional[float],
    grad_scale: Optional[torch.Tensor] = None,
) -> None:
    """One LAMB/FLAMBe step on lists of tensors (in place). For the factors of ``fd``'s forms the decay term is
    ``lambda_kind * dFD/dw`` (from the weights before the step) instead of ``weight_decay * w``."""
    fd_ids = fd.param_ids() if fd is not None else set()
    pending: Dict[int, torch.Tensor] = {}  # factors: r waits for its FD term
    for w, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        g = g.to(m.dtype)  # float32 for half-precision parameters (see optim.base)
        if grad_scale is not None:
            g = g / grad_scale  # global gradient-norm pre-normalization
        m.mul_(beta1).add_(g, alpha=1 - beta1)  # Adam moments (LAMB Alg. 2)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1, bc2 = (1 - beta1**t, 1 - beta2**t) if bias_correction else (1.0, 1.0)
        r = (m / bc1).div_((v / bc2).sqrt_().add_(eps))  # m_hat / (sqrt(v_hat) + eps)
        if id(w) in fd_ids:
            pending[id(w)] = r
            continue
        w32 = working_copy(w)
        if weight_decay != 0:
            r.add_(w32, alpha=weight_decay)  # LAMB: + wd * w
        _trust_step(w32, r, lr, trust_clip)
        write_back(w, w32)
    if pending and fd is not None:
        fd.add_to(pending)  # FLAMBe: r += lambda dFD/dw (paper Sec. 6), where LAMB puts weight decay
        for w in params:
            if id(w) in pending:
                w32 = working_copy(w)
                _trust_step(w32, pending[id(w)], lr, trust_clip)
                write_back(w, w32)


def _trust_step(w: torch.Tensor, r: torch.Tensor, lr: float, trust_clip: Optional[float]) -> None:
    """``w -= lr * q * r`` with the trust ratio ``q = ||w|| / ||r||`` (1 if a norm is 0), ``min(q, trust_clip)``."""
    w_norm = torch.linalg.vector_norm(w)
    r_norm = torch.linalg.vector_norm(r)
    trust = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, torch.ones_like(w_norm))
    if trust_clip is not None:
        trust = trust.clamp(max=trust_clip)
    w.add_(r.mul_(trust), alpha=-lr)


class Lamb(FDOptimizer):
    """LAMB with bias correction, decoupled weight decay and per-tensor trust ratio (see module docstring).

    Args:
        params: parameters or groups (``fnl_transformers.optim.param_groups(model, weight_decay=...)`` keeps
            biases and LayerNorm out of decay).
        lr: learning rate (default ``1e-3``).
        betas: ``(beta1, beta2)``, each in ``[0, 1)`` (default ``(0.9, 0.999)``).
        eps: added to ``sqrt(v_hat)`` (default ``1e-6``).
        weight_decay: decoupled decay ``wd * w`` inside the trust ratio (default ``0.01``).
        bias_correction: divide the moments by ``1 - beta^t`` (default ``True``).
        trust_clip: upper bound on the trust ratio, or ``None`` (default) for none.
        max_grad_norm: global gradient-norm pre-normalization threshold (NVIDIA uses ``1.0``), or ``None``
            (default) to use gradients as they are.
    """

    supports_fd = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                 bias_correction: bool = True, trust_clip: Optional[float] = None,
                 max_grad_norm: Optional[float] = None):
        if max_grad_norm is not None:
            check_number("max_grad_norm", max_grad_norm, low_open=True, fix=" (None disables pre-normalization)")
        self.max_grad_norm = max_grad_norm
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        trust_clip=trust_clip)
        super().__init__(params, defaults)

    def check_group(self, group: dict, index: int) -> None:
        if group["trust_clip"] is not None:
            check_number(f"param group {index}: trust_clip", group["trust_clip"], low_open=True,
                         fix=" (None disables clipping)")
        if not isinstance(group["bias_correction"], bool):
            raise ValueError(f"param group {index}: bias_correction must be True or False, "
                             f"got {group['bias_correction']!r}")

    def _grad_scale(self) -> Optional[torch.Tensor]:
        """``max(1, ||G|| / max_grad_norm)`` over every gradient of the optimizer, or None."""
        if self.max_grad_norm is None:
            return None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32  # >= float32
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=dtype) for g in grads]))
        return torch.clamp(total / self.max_grad_norm, min=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = self._grad_scale()
        for group in self.param_groups:
            fd = group_forms(group) if self.supports_fd else None
            params, grads, exp_avgs, exp_avg_sqs, steps = self._gather(group)
            beta1, beta2 = group["betas"]
            lamb_update(params, grads, exp_avgs, exp_avg_sqs, steps, fd, lr=group["lr"], beta1=beta1, beta2=beta2,
                        eps=group["eps"], weight_decay=group["weight_decay"],
                        bias_correction=group["bias_correction"], trust_clip=group["trust_clip"],
                        grad_scale=grad_scale)
        return loss


class FLAMBe(Lamb):
    """FLAMBe (paper Sec. 6 and Table 4): :class:`Lamb` whose decay term, for factors of factorized forms, is decoupled
    Frobenius decay ``lambda_kind * dFD/dw`` instead of ``weight_decay * w``.

    Forms and coefficients come from the parameter groups (``group["fd_forms"]``, ``group["fd"]``), which
    :func:`fnl_transformers.optim.param_groups` builds::

        FLAMBe(param_groups(model, fd_ov=1e-2, weight_decay=0.01), lr=1e-3)  # the paper's BERT setting

    Parameters outside forms keep regular decay; a group with active FD must have ``weight_decay=0``.
    With all FD coefficients 0 it is exactly :class:`Lamb`. Same arguments as :class:`Lamb`.
    """

    supports_fd = True
