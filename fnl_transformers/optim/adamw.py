"""AdamW (Loshchilov & Hutter, 2019) with decoupled Frobenius decay on factorized forms (Khodak et al., ICLR 2021).

For each parameter tensor ``w`` (same operations, in the same order, as ``torch.optim.AdamW``):

* decoupled decay from the weights before the step: ``w <- w - lr * d`` where ``d = weight_decay * w``
  (AdamW) or, for factors of a factorized form, ``d = lambda_kind * dFD/dw`` with ``FD = 1/2 ||W_form||_F^2``
  (paper Definition 3.2);
* ``m = beta1 m + (1 - beta1) g``, ``v = beta2 v + (1 - beta2) g^2``;
* ``w <- w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch

from ._fd import fd_terms
from .base import FDOptimizer, working_copy, write_back


def adamw_update(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    steps: List[int],
    fd: Dict[int, torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step on lists of tensors (in place). ``fd[id(w)]`` replaces ``weight_decay * w``."""
    for w, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        d = fd.get(id(w))
        w32, g = working_copy(w), g.to(m.dtype)  # float32 for half-precision parameters (see optim.base)
        if d is not None:
            w32.add_(d, alpha=-lr)  # decoupled FD: w -= lr * lambda dFD/dw (paper Definition 3.2)
        elif weight_decay != 0:
            w32.mul_(1 - lr * weight_decay)  # decoupled weight decay: w -= lr * wd * w
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1**t)
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        w32.addcdiv_(m, denom, value=-step_size)
        write_back(w, w32)


class AdamWFD(FDOptimizer):
    """AdamW whose decay, for factors of factorized forms, is decoupled Frobenius decay.

    Groups as for :class:`~fnl_transformers.optim.FLAMBe` (``AdamWFD(param_groups(model, fd_linear=1e-4))``);
    with FD coefficients 0 it equals ``torch.optim.AdamW``. Defaults are AdamW's: ``lr=1e-3``,
    ``betas=(0.9, 0.999)``, ``eps=1e-8``, ``weight_decay=1e-2``. No amsgrad.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            fd = fd_terms(group)  # from the weights before this step
            params, grads, exp_avgs, exp_avg_sqs, steps = self._gather(group)
            beta1, beta2 = group["betas"]
            adamw_update(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                fd,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
        return loss
