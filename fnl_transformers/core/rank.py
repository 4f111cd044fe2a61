"""Rank rule and argument checks shared by every factorization.

The paper (Khodak et al., ICLR 2021, Section 2) parameterizes a factorized layer's rank by a
*rank scale* ``rho``: a layer ``W in R^{m x n}`` gets rank ``round(rho * min(m, n))``.
``rho < 1`` compresses, ``rho >= 1`` is overcomplete (teacher-free distillation).
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .settings import check_param_ratio  # the one rule for target parameter ratios (re-exported here)


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


def check_matrix(name: str, weight: torch.Tensor) -> torch.Tensor:
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
    if rank is not None:
        return check_positive_int("rank", rank)
    if rank_scale is None:
        raise ValueError("give rank (an integer >= 1) or rank_scale (a number > 0)")
    return rank_from_scale(m, n, rank_scale)


def factorized_param_count(m: int, n: int, rank: int, deep: bool = False, bias: bool = False) -> int:
    """Parameters of ``U (m x r) [M (r x r)] V^T (r x n)`` plus an optional bias of size m."""
    return rank * (m + n) + (rank * rank if deep else 0) + (m if bias else 0)


def _shapes(model: nn.Module, include: Callable[[str, nn.Module], bool]) -> list:
    shapes = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and include(name, module):
            m, n = module.weight.shape
            shapes.append((m, n))
    return shapes


def factorized_total(shapes: Sequence[Tuple[int, int]], rest: int, scale: float, deep: bool = False) -> int:
    """Parameters of ``rest`` plus the layers of ``shapes`` factorized at rank scale ``scale`` (no biases)."""
    return rest + sum(factorized_param_count(m, n, rank_from_scale(m, n, scale), deep) for m, n in shapes)


def rank_scale_for_budget(
    shapes: Sequence[Tuple[int, int]], rest: int, budget: float, deep: bool = False, tol: float = 1e-4
) -> float:
    """Largest rank scale whose factorized layers (``m x n`` each, from shapes alone) plus ``rest`` other
    parameters count at most ``budget``. Bisection: the rank rule makes the count a step function.
    Raises ValueError when even rank 1 everywhere exceeds the budget."""
    if not shapes:
        raise ValueError("no layer to factorize: the rank scale has nothing to act on")
    lo, hi = 1e-9, 1.0
    smallest = factorized_total(shapes, rest, lo, deep)
    if smallest > budget:
        raise ValueError(
            f"unreachable: rank 1 in every factorized layer still keeps {smallest:,} parameters, more "
            f"than the budget of {int(budget):,}"
        )
    while factorized_total(shapes, rest, hi, deep) <= budget and hi < 1e6:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if factorized_total(shapes, rest, mid, deep) <= budget:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol * lo:
            break
    return lo


def rank_scale_for_param_ratio(
    model: nn.Module,
    target_ratio: float,
    include: Callable[[str, nn.Module], bool] = lambda name, module: True,
    deep: bool = False,
    tol: float = 1e-4,
) -> float:
    """Smallest-error rank scale whose factorized layers keep ``target_ratio`` of the whole model's parameters.

    ``include(name, module)`` selects the ``nn.Linear``/``nn.Embedding`` layers that would be factorized.
    ``target_ratio`` must be in (0, 1] (:func:`check_param_ratio`, the rule of every target ratio setting).
    The ratio counts all parameters of ``model`` (factorized layers at their new size, everything else unchanged).
    The returned scale is the largest one whose count does not exceed the target (:func:`rank_scale_for_budget`).
    """
    target_ratio = check_param_ratio(target_ratio, "target_ratio")
    shapes = _shapes(model, include)
    if not shapes:
        raise ValueError("no nn.Linear or nn.Embedding layer matched `include`; nothing to factorize")
    total = sum(p.numel() for p in model.parameters())
    rest = total - sum(m * n for m, n in shapes)
    smallest = factorized_total(shapes, rest, 1e-9, deep)
    if smallest > target_ratio * total:
        raise ValueError(
            f"target_ratio {target_ratio} is below the smallest reachable ratio {smallest / total:.4f} (rank 1 "
            "everywhere)"
        )
    return rank_scale_for_budget(shapes, rest, target_ratio * total, deep, tol)


def plan_ranks(
    layers: Sequence[Tuple[str, int, int]], structure, params_before: int, params_now: Optional[int] = None
) -> Dict[str, int]:
    """``{layer name: rank}`` of the layers to factorize, from shapes only.

    ``layers``: ``(qualified name, m, n)`` of every candidate layer (the parts in ``structure.factorize``);
    ``structure``: a :class:`~fnl_transformers.core.StructureSpec`. A layer's rank is that of the first
    ``structure.ranks`` pattern (``fnmatch``) matching its name, else ``rank_from_scale`` with the rank scale (or,
    with ``target_param_ratio``, the scale whose model keeps that fraction of ``params_before`` parameters, the
    model counting ``params_now`` parameters before this factorization); a layer with neither is not
    factorized. A pattern matching no candidate layer is an error."""
    from .settings import SettingsError

    params_now = params_before if params_now is None else params_now
    explicit: Dict[str, int] = {}
    used = set()
    for name, _, _ in layers:
        for pattern, rank in structure.ranks.items():
            if fnmatch.fnmatchcase(name, pattern):
                explicit[name] = rank
                used.add(pattern)
                break
    unused = [p for p in structure.ranks if p not in used]
    if unused:
        examples = ", ".join(name for name, _, _ in layers[:4]) or "none"
        raise SettingsError(
            lambda n: (
                f"{n('ranks')}: pattern(s) {unused} match no layer of the parts "
                f"{list(structure.factorize)} (layer names look like: {examples})"
            )
        )
    scale = structure.rank_scale
    if structure.target_param_ratio is not None:
        scaled = [(m, n) for name, m, n in layers if name not in explicit]
        if not scaled:
            raise SettingsError(
                lambda n: (
                    f"{n('target_param_ratio')}: every layer has an explicit rank in "
                    f"{n('ranks')}; nothing left to scale"
                )
            )
        rest = (
            params_now
            - sum(m * n for m, n in scaled)
            + sum(
                factorized_param_count(m, n, explicit[name], structure.deep) - m * n
                for name, m, n in layers
                if name in explicit
            )
        )
        try:
            scale = rank_scale_for_budget(scaled, rest, structure.target_param_ratio * params_before, structure.deep)
        except ValueError:
            smallest = factorized_total(scaled, rest, 1e-9, structure.deep)
            raise SettingsError(
                lambda n: (
                    f"{n('target_param_ratio')} {structure.target_param_ratio} is unreachable: rank 1 in every "
                    f"factorized layer still keeps {smallest / params_before:.4f} of the parameters; raise the ratio "
                    "or factorize more parts"
                )
            ) from None
    ranks = {}
    for name, m, n in layers:
        if name in explicit:
            ranks[name] = explicit[name]
        elif scale is not None:
            ranks[name] = rank_from_scale(m, n, scale)
    _warn_growth(layers, ranks, explicit, structure)
    return ranks


def _warn_growth(layers, ranks: Dict[str, int], explicit: Dict[str, int], structure) -> None:
    """One warning for factorized layers with more parameters than their dense weight (``r (m + n) > m n``) that
    nobody asked to be overcomplete (``deep``, or a rank scale >= 1, is asking)."""
    if structure.deep:
        return
    intended = structure.rank_scale is not None and structure.rank_scale >= 1
    grown = [
        (name, m, n, ranks[name], factorized_param_count(m, n, ranks[name]))
        for name, m, n in layers
        if name in ranks and (name in explicit or not intended) and factorized_param_count(m, n, ranks[name]) > m * n
    ]
    if not grown:
        return
    shown = "; ".join(
        f"{name} rank {r} of {m} x {n}: {m * n:,} -> {after:,} parameters" for name, m, n, r, after in grown[:3]
    ) + (f"; +{len(grown) - 3} more" if len(grown) > 3 else "")
    growth = sum(after - m * n for _, m, n, _, after in grown)
    warnings.warn(
        f"{len(grown)} factorized layer(s) get more parameters than their dense weights ({shown}; "
        f"{growth:+,} in all): ranks below m n / (m + n) compress; for overcomplete factors on purpose "
        "use a rank scale >= 1 or deep",
        UserWarning,
        stacklevel=2,
    )
