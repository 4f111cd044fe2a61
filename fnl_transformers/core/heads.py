"""Attention surgery on the per-head QK and OV forms (paper Sec. 2.3, Eq. (1)), once for every integration.

Tensors are ``{q,k,v,o}_{weight,bias}`` dicts in ``nn.Linear`` layout (q/k/v weights ``(heads * head_dim) x
d_in``, o ``d_out x (heads * head_dim)``; absent biases are ``None``), the interface of
:func:`~fnl_transformers.core.attention_spectral_init`. Integrations only map their module names and weight
layouts to and from these dicts.

* :func:`shrink_heads`: new tensors at reduced per-head dims, each form by per-head SI (Definition 3.1; at full
  dim it re-balances the factors, the function unchanged), by activation-aware per-head SI on calibration
  statistics (:func:`~fnl_transformers.core.activation.attention_activation_init`), by a caller-supplied random
  initialization, by that random initialization with each reduced head's own product then re-balanced (the
  official code's rule), or kept (:func:`shrink_heads_with_errors` also returns the activation-aware fit errors);
* :func:`head_shapes`: the shapes alone (planning, parameter counts, rebuilding before loading weights);
* :func:`pad_heads`: zero-pad reduced heads back to the full head dim, folding a score-scaling ratio into the
  query (zero rows add nothing to ``q . k`` or to the output);
* :func:`head_products`: per-head QK forms ``[W_q,h | b_q,h]^T W_k,h`` (the query bias acts on a constant input
  1) and OV forms ``W_o,h W_v,h``, for reports; :func:`form_rel_errors` compares two sets of them;
* the shrink-only rule is :func:`fnl_transformers.core.settings.check_shrink`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import torch

from .activation import FitErrors, HeadCalibration, attention_activation_init
from .attention import attention_spectral_init
from .forms import FactorView, attention_form_specs, attention_forms
from .settings import HEAD_FORMS, check_shrink

Tensors = Dict[str, Optional[torch.Tensor]]
KEYS = tuple(f"{p}_{t}" for p in "qkvo" for t in ("weight", "bias"))
FORM_KEYS = {"qk": ("q_weight", "q_bias", "k_weight", "k_bias"), "ov": ("v_weight", "v_bias", "o_weight", "o_bias")}
INITS = ("spectral", "activation", "random", "balanced")

# fresh(key, shape, like) -> a newly initialized tensor of ``shape`` for entry ``key`` (``like``: the current one)
FreshInit = Callable[[str, Tuple[int, ...], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HeadDims:
    """Per-head dimensions of one attention module: ``heads`` query heads sharing ``kv_heads`` key/value heads,
    the original ``head_dim``, and the QK and OV dims."""

    heads: int
    kv_heads: int
    head_dim: int
    qk: int
    ov: int

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        for form in HEAD_FORMS:
            check_shrink(f"{form.upper()} head dim", getattr(self, form), self.head_dim)

    @property
    def full(self) -> "HeadDims":
        return replace(self, qk=self.head_dim, ov=self.head_dim)

    @property
    def changed(self) -> bool:
        return self.qk != self.head_dim or self.ov != self.head_dim

    def shrinks(self, form: str) -> bool:
        return getattr(self, form) != self.head_dim

    def per_key(self) -> Dict[str, Tuple[int, int]]:
        """``{q,k,v,o}: (heads, per-head dim)`` of each projection."""
        return {
            "q": (self.heads, self.qk),
            "k": (self.kv_heads, self.qk),
            "v": (self.kv_heads, self.ov),
            "o": (self.heads, self.ov),
        }


def weights(t: Tensors) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, k, v, o)`` weights of ``t`` (one clear error for a missing one)."""
    out = []
    for key in ("q_weight", "k_weight", "v_weight", "o_weight"):
        w = t.get(key)
        if w is None:
            raise ValueError(f"attention tensors lack {key!r} (nn.Linear layout: q/k/v/o weights, optional biases)")
        out.append(w)
    return out[0], out[1], out[2], out[3]


def head_shapes(t: Tensors, dims: HeadDims) -> Dict[str, Optional[Tuple[int, ...]]]:
    """Shapes of the tensors ``t`` (any per-head dims, same layout) after resizing the heads to ``dims``."""
    q, _, _, o = weights(t)
    d_in, d_out = q.shape[1], o.shape[0]
    out: Dict[str, Optional[Tuple[int, ...]]] = {}
    for key, (heads, dim) in dims.per_key().items():
        rows = heads * dim
        out[f"{key}_weight"] = (d_out, rows) if key == "o" else (rows, d_in)
        bias = t.get(f"{key}_bias")
        out[f"{key}_bias"] = None if bias is None else ((d_out,) if key == "o" else (rows,))
    return out


def form_param_counts(t: Tensors, dims: HeadDims) -> Dict[str, int]:
    """``{"qk": n, "ov": n}``: parameters of each form's projections (o's bias counted with OV) at ``dims``."""
    shapes = head_shapes(t, dims)
    count = lambda s: 0 if s is None else int(torch.Size(s).numel())  # noqa: E731
    return {form: sum(count(shapes[k]) for k in keys) for form, keys in FORM_KEYS.items()}


def shrink_heads(
    t: Tensors,
    dims: HeadDims,
    init_qk: Optional[str],
    init_ov: Optional[str],
    fresh: Optional[FreshInit] = None,
    calibration: Optional[HeadCalibration] = None,
) -> Tensors:
    """Tensors of the attention ``t`` (full heads) resized to ``dims``, form by form.

    ``init_<form>``: ``"spectral"`` (per-head SI, :func:`~fnl_transformers.core.attention_spectral_init`: exact
    truncation; key bias dropped, value bias folded into the output bias), ``"activation"`` (per-head SI of the
    forms scaled by the ``calibration`` statistics,
    :func:`~fnl_transformers.core.activation.attention_activation_init`, same bias handling), ``"random"``
    (``fresh(key, shape, like)`` for each of the form's tensors), ``"balanced"`` (``"random"``, then per-head SI
    of those fresh tensors at their own dim: each head's product unchanged, its factors re-balanced) or ``None``
    (kept as is: only allowed where the form keeps its dim). Entries of forms kept are the input tensors
    themselves."""
    return shrink_heads_with_errors(t, dims, init_qk, init_ov, fresh, calibration)[0]


def shrink_heads_with_errors(
    t: Tensors,
    dims: HeadDims,
    init_qk: Optional[str],
    init_ov: Optional[str],
    fresh: Optional[FreshInit] = None,
    calibration: Optional[HeadCalibration] = None,
) -> Tuple[Tensors, Dict[str, FitErrors]]:
    """:func:`shrink_heads` and ``{form: FitErrors}`` of the forms initialized ``"activation"`` (the minimized,
    output and weight relative errors over all heads)."""
    inits = {"qk": init_qk, "ov": init_ov}
    for form, init in inits.items():
        if init is None and dims.shrinks(form):
            raise ValueError(
                f"the {form.upper()} heads shrink from {dims.head_dim} to {getattr(dims, form)}: choose "
                f"their initialization ({' or '.join(INITS)})"
            )
        if init is not None and init not in INITS:
            raise ValueError(f"head initialization must be one of {INITS} or None, got {init!r}")
    out = dict(t)
    errors: Dict[str, FitErrors] = {}
    kv_heads = None if dims.kv_heads == dims.heads else dims.kv_heads
    spectral = [form for form, init in inits.items() if init == "spectral"]
    if spectral:
        out.update(_spectral(t, dims, spectral))
    activation = [form for form, init in inits.items() if init == "activation"]
    if activation:
        if calibration is None:
            raise ValueError(
                "activation-aware head initialization needs the attention input's statistics (calibration)"
            )
        q, k, v, o = weights(t)
        new, fits = attention_activation_init(
            q,
            k,
            v,
            o,
            dims.heads,
            calibration.second_moment,
            calibration.mean,
            qk_rank=dims.qk,
            ov_rank=dims.ov,
            q_bias=t.get("q_bias"),
            k_bias=t.get("k_bias"),
            v_bias=t.get("v_bias"),
            o_bias=t.get("o_bias"),
            num_kv_heads=kv_heads,
            ov_second_moment=calibration.ov_second_moment,
            damping=calibration.damping,
        )
        for form in activation:
            out.update({k: new[k] for k in FORM_KEYS[form]})
            errors[form] = fits[form]
    random = [form for form, init in inits.items() if init in ("random", "balanced")]
    if random:
        if fresh is None:
            raise ValueError("random head initialization needs a `fresh` initializer")
        shapes = head_shapes(t, dims)
        for form in random:
            for key in FORM_KEYS[form]:
                shape, like = shapes[key], t.get(key)
                out[key] = None if shape is None or like is None else fresh(key, shape, like)
    balanced = [form for form, init in inits.items() if init == "balanced"]
    if balanced:  # per-head SI of the fresh reduced heads at their own dim: re-balance only
        out.update(_spectral(out, dims, balanced))
    return out, errors


def _spectral(t: Tensors, dims: HeadDims, forms) -> Tensors:
    """Per-head SI of the ``forms`` of ``t`` at ``dims`` (core :func:`attention_spectral_init`)."""
    q, k, v, o = weights(t)
    si = attention_spectral_init(
        q,
        k,
        v,
        o,
        dims.heads,
        qk_rank=dims.qk,
        ov_rank=dims.ov,
        q_bias=t.get("q_bias"),
        k_bias=t.get("k_bias"),
        v_bias=t.get("v_bias"),
        o_bias=t.get("o_bias"),
        num_kv_heads=None if dims.kv_heads == dims.heads else dims.kv_heads,
        forms=forms,
    )
    out: Tensors = {}
    for form in forms:
        out.update({k: si[k] for k in FORM_KEYS[form]})
    return out


def _views(dims: HeadDims) -> Dict[str, FactorView]:
    """The per-head view of each projection, as the QK / OV forms read it (q, k, v rows; o columns)."""
    qk, ov = attention_form_specs(
        "q", "k", "v", "o", dims.heads, None if dims.kv_heads == dims.heads else dims.kv_heads
    )
    return {"q": qk.a, "k": qk.b, "v": ov.b, "o": ov.a}


def pad_heads(t: Tensors, dims: HeadDims, fold: float = 1.0) -> Tensors:
    """Reduced heads (``dims``) zero-padded back to ``dims.head_dim``; the query weight and bias are multiplied by
    ``fold`` (the ratio of the score scaling used to the one the padded attention applies). The output bias is
    unchanged; the function computed is the same. Written through the forms' per-head views."""
    out: Tensors = {}
    for key, view in _views(dims).items():
        dim = dims.per_key()[key][1]
        c = fold if key == "q" else 1.0
        for part in ("weight", "bias"):
            x = t.get(f"{key}_{part}")
            if x is None or (key == "o" and part == "bias"):
                out[f"{key}_{part}"] = x
                continue
            x = x if part == "weight" else x.reshape(-1, 1)  # a bias is one more input column of its rows
            heads = view.view(x)  # (heads, columns, per-head dim)
            if heads.shape[2] != dim:
                raise ValueError(f"{key}_{part} has per-head dim {heads.shape[2]}, expected {dim}")
            check_shrink(f"{key} per-head dim", dim, dims.head_dim)
            rows, cols = view.heads * dims.head_dim, heads.shape[1]
            padded = x.new_zeros((cols, rows) if view.transpose else (rows, cols))
            view.view(padded)[:, :, :dim] = heads * c if c != 1.0 else heads
            out[f"{key}_{part}"] = padded if part == "weight" else padded.reshape(-1)
    return out


def head_products(t: Tensors, dims: HeadDims) -> Dict[str, torch.Tensor]:
    """Per-head forms in float32: ``"qk"`` ``[W_q,h | b_q,h]^T W_k,h`` ((d + 1) x d with a query bias, the form
    per-head SI approximates) and ``"ov"`` ``W_o,h W_v,h`` (d_out x d)."""
    q, k, v, o = (w.detach() for w in weights(t))
    views = attention_forms(q, k, v, o, dims.heads, num_kv_heads=None if dims.kv_heads == dims.heads else dims.kv_heads)
    qk, ov = views["qk"], views["ov"]
    q_bias = t.get("q_bias")
    if q_bias is not None:
        bias = q_bias.detach().to(qk.A.dtype).view(dims.heads, 1, -1)
        qk = replace(qk, A=torch.cat([qk.A, bias], dim=1))
    return {"qk": qk.products(), "ov": ov.products()}


def form_rel_errors(before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """``||P - P'||_F / ||P||_F`` over all heads, per form (0 for an all-zero form matched exactly)."""
    out = {}
    for form in HEAD_FORMS:
        ref, approx = before[form].float(), after[form].float()
        den, num = float(ref.norm()), float((ref - approx).norm())
        out[form] = num / den if den > 0 else num
    return out


__all__ = [
    "FORM_KEYS",
    "HeadDims",
    "KEYS",
    "form_param_counts",
    "form_rel_errors",
    "head_products",
    "head_shapes",
    "pad_heads",
    "shrink_heads",
    "shrink_heads_with_errors",
]
