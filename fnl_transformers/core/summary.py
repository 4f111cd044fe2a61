"""Parameter summary of a model with factorized forms (in the style of PEFT's ``print_trainable_parameters``).

Counts (each parameter once, however often it is shared or tied):

* ``total``, ``trainable`` (``requires_grad``) and ``trainable_percent``;
* ``factorized``: factors (``U``, ``V``, ``M``) of factorized layers (kinds ``linear`` and ``embedding``);
* ``attention``: projections that are factors of attention forms (kinds ``qk`` and ``ov``);
* ``by_kind``: per kind, the parameters that are factors of a form of that kind (a parameter of two kinds, such as
  GPT-2's fused ``c_attn`` in both QK and OV forms, counts in both);
* ``other``: everything that is no factor of any form (biases, norms, position embeddings, ...);
* ``original``: the parameter count before factorization when the caller knows it (``None`` otherwise).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn

from .forms import KINDS, form_parameters


def parameter_summary(model: nn.Module, original: Optional[int] = None) -> Dict[str, Any]:
    """The counts described in the module docstring, as a dict of ints (and ``trainable_percent``, a float)."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    of_kind: Dict[str, Dict[int, int]] = {k: {} for k in KINDS}
    for _, p, kind in form_parameters(model):
        of_kind[kind][id(p)] = p.numel()
    union = lambda kinds: sum({i: n for k in kinds for i, n in of_kind[k].items()}.values())  # noqa: E731
    return {
        "total": total,
        "trainable": trainable,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
        "factorized": union(("linear", "embedding")),
        "attention": union(("qk", "ov")),
        "by_kind": {k: sum(of_kind[k].values()) for k in KINDS},
        "other": total - union(KINDS),
        "original": original,
    }


def format_parameter_summary(summary: Dict[str, Any]) -> str:
    """One line: ``trainable params: T || all params: A || trainable%: P || factorized: F || attention forms: Q
    [|| of the original N: R]``."""
    total = summary["total"]
    share = lambda n: f"{100.0 * n / total:.2f}%" if total else "0%"  # noqa: E731
    parts = [
        f"trainable params: {summary['trainable']:,}",
        f"all params: {total:,}",
        f"trainable%: {summary['trainable_percent']:.4f}",
        f"factorized (U, V): {summary['factorized']:,} ({share(summary['factorized'])})",
        f"attention forms (QK/OV projections): {summary['attention']:,} ({share(summary['attention'])})",
    ]
    if summary.get("original"):
        parts.append(f"of the original {summary['original']:,}: {total / summary['original']:.3f}")
    return " || ".join(parts)


def print_parameter_summary(model: nn.Module, original: Optional[int] = None) -> None:
    """Print :func:`format_parameter_summary` of ``model``."""
    print(format_parameter_summary(parameter_summary(model, original)))
