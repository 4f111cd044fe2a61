"""Numerical guards: report a non-finite loss or factor by name instead of letting it propagate silently."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class NonFiniteError(FloatingPointError):
    """A loss, parameter or gradient holds NaN or Inf; the message names where."""


def check_finite(model: nn.Module, loss: Optional[torch.Tensor] = None, grads: bool = False) -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite ``loss``, parameter (or, with ``grads``,
    gradient) of ``model``, and the module that owns it. Costs one reduction per tensor."""
    if loss is not None:
        value = float(loss.detach().float().sum()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            raise NonFiniteError(f"loss is {value}; check the learning rate, FD coefficients and input data")
    for name, p in model.named_parameters():
        tensors = [("parameter", p)] + ([("gradient", p.grad)] if grads and p.grad is not None else [])
        for what, t in tensors:
            if not bool(torch.isfinite(t).all()):
                bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                owner = name.rsplit(".", 1)[0] if "." in name else "<model>"
                raise NonFiniteError(
                    f"{what} {name!r} (layer {owner!r}) contains {bad}; lower the learning rate or FD "
                    "coefficient, or enable gradient clipping"
                )
