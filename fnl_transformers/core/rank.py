"""Rank rule and argument checks shared by every factorization.

The paper (Khodak et al., ICLR 2021, Section 2) parameterizes a factorized layer's rank by a
*rank scale* ``rho``: a layer ``W in R^{m x n}`` gets rank ``round(rho * min(m, n))``.
``rho < 1`` compresses, ``rho >= 1`` is overcomplete (teacher-free distillation).

This module imports torch only inside the functions that need it, so its validators run (in the ``fnl`` command,
in settings classes) before torch is loaded.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


def check_positive_int(name: str, value, hint: str = "") -> int:
    """Return ``value`` as an int if it is a positive integer, else raise one clear ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}{hint}")
    return value


def check_rank_scale(rank_scale, name: str = "rank_scale") -> float:
    """A rank scale must be a finite number > 0 (values >= 1 mean overcomplete factors)."""
    try:
        value = float(rank_scale)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number > 0, got {rank_scale!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{name} must be a finite number > 0 (< 1 compresses, >= 1 is overcomplete), got {rank_scale!r}"
        )
    return value


def check_param_ratio(ratio, name: str = "target_param_ratio") -> float:
    """A target fraction of a model's parameters to keep: a finite number in (0, 1] (factorizing can only remove
    parameters towards a target; overcomplete factors are chosen by rank_scale >= 1 instead)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"{name} must be a number in (0, 1] (the fraction of the parameters to keep), got {ratio!r}")
    if ratio > 1:
        raise ValueError(f"{name} must be in (0, 1], got {ratio!r}: keeping more parameters than the model has "
                         "would need factorized layers larger than the dense ones; ask for a smaller fraction "
                         "(overcomplete factors are chosen with rank_scale >= 1)")
    return float(ratio)


def check_matrix(name: str, weight: torch.Tensor) -> torch.Tensor:
    import torch

    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix (out x in), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(weight.shape)}")
    return weight


def rank_from_scale(m: int, n: int, rank_scale: float) -> int:
    """The paper's rank rule: ``rank = max(1, round(rank_scale * min(m, n)))``."""
    rank_scale = check_rank_scale(rank_scale)
    return max(1, int(round(rank_scale * min(m, n))))


def resolve_rank(m: int, n: int, rank: Optional[int] = None, rank_scale: Optional[float] = None) -> int:
    """Exactly one of ``rank`` and ``rank_scale`` chooses the rank of an ``m x n`` layer."""
    if rank is not None and rank_scale is not None:
        raise ValueError("give either rank or rank_scale, not both")
    if rank is None and rank_scale is None:
        raise ValueError("give rank (an integer >= 1) or rank_scale (a number > 0)")
    if rank is not None:
        return check_positive_int("rank", rank)
    return rank_from_scale(m, n, rank_scale)


def factorized_param_count(m: int, n: int, rank: int, deep: bool = False, bias: bool = False) -> int:
    """Parameters of ``U (m x r) [M (r x r)] V^T (r x n)`` plus an optional bias of size m."""
    return rank * (m + n) + (rank * rank if deep else 0) + (m if bias else 0)


def _shapes(model: nn.Module, include: Callable[[str, nn.Module], bool]) -> list:
    from torch import nn

    shapes = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and include(name, module):
            m, n = module.weight.shape
            shapes.append((m, n))
    return shapes


def rank_scale_for_param_ratio(
    model: nn.Module,
    target_ratio: float,
    include: Callable[[str, nn.Module], bool] = lambda name, module: True,
    deep: bool = False,
    tol: float = 1e-4,
) -> float:
    """Smallest-error rank scale whose factorized layers keep ``target_ratio`` of the whole model's parameters.

    ``include(name, module)`` selects the ``nn.Linear``/``nn.Embedding`` layers that would be factorized.
    ``target_ratio`` must be in (0, 1] (:func:`check_param_ratio`, the rule every setting of a target ratio uses).
    The ratio counts all parameters of ``model`` (factorized layers at their new size, everything else unchanged).
    Bisection on the rank scale; the rank rule makes the count a step function, so the returned scale is the
    largest one whose count does not exceed the target.
    """
    target_ratio = check_param_ratio(target_ratio, "target_ratio")
    shapes = _shapes(model, include)
    if not shapes:
        raise ValueError("no nn.Linear or nn.Embedding layer matched `include`; nothing to factorize")
    total = sum(p.numel() for p in model.parameters())
    dense = sum(m * n for m, n in shapes)
    rest = total - dense

    def count(scale: float) -> int:
        return rest + sum(factorized_param_count(m, n, rank_from_scale(m, n, scale), deep) for m, n in shapes)

    target = target_ratio * total
    lo, hi = 1e-9, 1.0
    if count(lo) > target:
        smallest = count(lo) / total
        raise ValueError(
            f"target_ratio {target_ratio} is below the smallest reachable ratio {smallest:.4f} (rank 1 everywhere)"
        )
    while count(hi) <= target and hi < 1e6:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol * lo:
            break
    return lo

