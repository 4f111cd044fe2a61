"""The learning-rate schedule of NVIDIA's BERT LAMB recipe: linear warmup, then polynomial decay.

NVIDIA DeepLearningExamples, ``PyTorch/LanguageModeling/BERT/schedulers.py``, ``PolyWarmUpScheduler(warmup,
total_steps, degree=0.5)``, stepped just before each optimizer step: update ``n`` (counted from 1) of a phase
with ``total`` updates uses the progress ``p = n / total`` and

* ``lr = base * p / warmup`` while ``p < warmup`` (``warmup`` is a fraction of ``total``),
* ``lr = base * (1 - p) ** degree`` afterwards.

Both as NVIDIA wrote them: the decay is not re-normalized to start at ``base`` (phase 1 of their recipe drops
from 6e-3 to about 5.08e-3 at the end of warmup), and the last update of a phase has ``lr = 0``.
"""

from __future__ import annotations

import math


def check_schedule(total: int, warmup: float, degree: float = 0.5) -> None:
    """One error line naming the bad value (``total`` updates >= 1, ``warmup`` in [0, 1), ``degree`` > 0)."""
    if not isinstance(total, int) or total < 1:
        raise ValueError(f"the number of updates must be an integer >= 1, got {total!r}")
    if not (isinstance(warmup, (int, float)) and math.isfinite(warmup) and 0 <= warmup < 1):
        raise ValueError(f"the warmup proportion must be in [0, 1) (a fraction of the updates), got {warmup!r}")
    if not (isinstance(degree, (int, float)) and math.isfinite(degree) and degree > 0):
        raise ValueError(f"the decay degree must be a number > 0, got {degree!r}")


def poly_warmup_factor(update: int, total: int, warmup: float, degree: float = 0.5) -> float:
    """The multiplier of the base learning rate for update ``update`` (1-based) of ``total``."""
    p = update / total
    if p < warmup:
        return p / warmup
    return max(0.0, 1.0 - p) ** degree


def poly_warmup_scheduler(optimizer, total: int, warmup: float, degree: float = 0.5):
    """A ``torch.optim.lr_scheduler.LambdaLR`` with :func:`poly_warmup_factor` for a trainer that calls
    ``scheduler.step()`` after each optimizer step (HuggingFace ``Trainer``): the scheduler's step ``s``
    (0 before the first update) sets the rate of update ``s + 1``. The base rate is each group's ``lr``."""
    from torch.optim.lr_scheduler import LambdaLR

    check_schedule(total, warmup, degree)
    for group in optimizer.param_groups:
        group.pop("initial_lr", None)  # a resumed optimizer carries its previous phase's base rate
    return LambdaLR(optimizer, lambda s: poly_warmup_factor(s + 1, total, warmup, degree))
