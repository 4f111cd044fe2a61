"""Factorized forms: where the products ``W = A M B^T`` of a model live, as views of its parameters.

A *form* is a batch of matrices ``W_h = A_h M B_{g(h)}^T`` (``h`` over heads, ``g(h) = h // (H / G)`` for
grouped-query attention) whose factors are read as **views** of 2-D parameters (no copies):

* ``FactorizedLinear``/``FactorizedEmbedding``: one form ``U [M] V^T`` (kind ``linear`` / ``embedding``).
* Multi-head attention (paper Sec. 2.3, Eq. (1)): per head the Query-Key form ``W_q,h W_k,h^T`` (kind
  ``qk``) and the Output-Value form ``W_o,h W_v,h`` (kind ``ov``), for any dense attention layer.

A :class:`FactorView` says how to read a batched factor ``(heads x dim x head_dim)`` from a parameter: take
the parameter (transposed or not) as ``(heads * head_dim) x dim`` rows, optionally a row slice of it (fused
projections such as GPT-2's ``c_attn``), and split the rows into heads. Integrations describe their layers
with these specs (:func:`register_attention_forms`); the math in :mod:`.frobenius` never sees layouts.
Specs are plain data, so they survive ``deepcopy``, pickling and ``.to(device)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Hashable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .settings import KINDS  # defined with the settings model (torch-free); re-exported here

ATTR = "fnl_attention_forms"  # attribute an integration sets on an attention module


@dataclass(frozen=True)
class FactorView:
    """A batched factor ``(heads x dim x head_dim)`` read as a view of the parameter named ``key``."""

    key: Hashable  # dotted parameter path relative to the owning module, or an index into a param list
    heads: int
    transpose: bool = False  # read the parameter as P.T
    start: int = 0  # row slice of (P.T if transpose else P), for fused projections
    stop: Optional[int] = None

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        rows = tensor.t() if self.transpose else tensor
        if self.start != 0 or self.stop is not None:  # a no-op slice would cost a zero-fill + copy in backward
            rows = rows[self.start : self.stop]
        if rows.shape[0] % self.heads:
            raise ValueError(f"{self.key}: {rows.shape[0]} rows do not split into {self.heads} heads")
        return rows.view(self.heads, rows.shape[0] // self.heads, rows.shape[1]).transpose(1, 2)


@dataclass(frozen=True)
class FormSpec:
    """One factorized form ``W_h = A_h [M] B_g(h)^T`` of a given ``kind``."""

    kind: str
    a: FactorView
    b: FactorView
    m: Optional[Hashable] = None  # inner r x r matrix of a deep factorization (U M V^T)

    def keys(self) -> Tuple[Hashable, ...]:
        return (self.a.key, self.b.key) + ((self.m,) if self.m is not None else ())

    def with_keys(self, mapping: Callable[[Hashable], Hashable]) -> "FormSpec":
        return replace(
            self,
            a=replace(self.a, key=mapping(self.a.key)),
            b=replace(self.b, key=mapping(self.b.key)),
            m=None if self.m is None else mapping(self.m),
        )

    def bind(self, lookup: "Lookup") -> "BoundForm":
        M = None if self.m is None else lookup(self.m)
        return BoundForm(self.kind, self.a.view(lookup(self.a.key)), self.b.view(lookup(self.b.key)), M)


@dataclass
class BoundForm:
    kind: str
    A: torch.Tensor  # H x m x k
    B: torch.Tensor  # G x n x k, H % G == 0
    M: Optional[torch.Tensor] = None  # k x k

    def products(self) -> torch.Tensor:
        """The dense per-head products ``W_h = A_h M B_g(h)^T`` (``H x m x n``; float32, float64 stays float64)."""
        dt = torch.float64 if self.A.dtype == torch.float64 else torch.float32
        A = self.A.to(dt) if self.M is None else self.A.to(dt) @ self.M.to(dt)
        B = self.B.to(dt)
        if B.shape[0] != A.shape[0]:
            B = B.repeat_interleave(A.shape[0] // B.shape[0], dim=0)  # head h uses group h // (H / G)
        return A @ B.transpose(1, 2)


Lookup = Callable[[Any], torch.Tensor]  # a form key -> the tensor it names


def module_lookup(module: nn.Module) -> Lookup:
    """The parameter at a dotted path relative to ``module`` (the keys of its form specs)."""

    def get(path: Any) -> torch.Tensor:
        obj: Any = module
        for part in str(path).split("."):
            obj = getattr(obj, part)
        return obj

    return get


def module_forms(module: nn.Module) -> List[FormSpec]:
    """Form specs declared by ``module`` itself (factorized layers) or registered on it (attention)."""
    d, cls = module.__dict__, type(module)  # looked up without nn.Module.__getattr__ (slow on a miss)
    own = getattr(module, "fnl_forms", None) if "fnl_forms" in d or hasattr(cls, "fnl_forms") else None
    specs = list(own()) if callable(own) else []
    return specs + list(d[ATTR] if ATTR in d else getattr(cls, ATTR, ()))


def iter_specs(model: nn.Module, kinds=KINDS) -> Iterator[Tuple[str, nn.Module, FormSpec]]:
    """Every form in ``model`` of the given kinds, unbound: ``(module_name, module, spec)`` (no parameter is read,
    so FSDP2-sharded parameters are never viewed as heads)."""
    for name, module in model.named_modules():
        for spec in module_forms(module):
            if spec.kind in kinds:
                yield name, module, spec


def iter_forms(model: nn.Module, kinds=KINDS) -> Iterator[Tuple[str, nn.Module, FormSpec, BoundForm]]:
    """Every form in ``model`` of the given kinds: ``(module_name, module, spec, bound views)``."""
    for name, module, spec in iter_specs(model, kinds):
        yield name, module, spec, spec.bind(module_lookup(module))


def form_parameters(model: nn.Module, kinds=KINDS) -> List[Tuple[str, torch.Tensor, str]]:
    """``(qualified_name, parameter, kind)`` for each parameter that is a factor of a form (a parameter
    shared by two kinds, such as GPT-2's fused ``c_attn``, is listed once per kind)."""
    out: List[Tuple[str, torch.Tensor, str]] = []
    seen = set()
    for name, module, spec in iter_specs(model, kinds):
        get = module_lookup(module)
        for key in spec.keys():
            p = get(key)
            if (id(p), spec.kind) not in seen:
                seen.add((id(p), spec.kind))
                out.append((f"{name}.{key}" if name else str(key), p, spec.kind))
    return out


def _split(rows: int, heads: int, what: str) -> int:
    if heads <= 0 or rows % heads:
        raise ValueError(f"{what}: {rows} output features do not divide into {heads} heads")
    return rows // heads


def attention_form_specs(
    q: str,
    k: str,
    v: str,
    o: str,
    num_heads: int,
    num_kv_heads: Optional[int] = None,
    transposed: bool = False,
    q_slice: Tuple[int, Optional[int]] = (0, None),
    k_slice: Tuple[int, Optional[int]] = (0, None),
    v_slice: Tuple[int, Optional[int]] = (0, None),
) -> List[FormSpec]:
    """QK and OV form specs of a multi-head attention layer (paper Sec. 2.3, Eq. (1): per-head ``Q_h K_h^T`` and
    ``O_h V_h``).

    ``q``/``k``/``v``/``o`` are parameter paths. Default layout is ``nn.Linear``'s: q/k/v weights are
    ``(heads * head_dim) x d`` and o is ``d x (heads * head_dim)``; ``transposed=True`` is the Conv1D layout
    (GPT-2). ``*_slice`` select the rows of a fused projection. ``num_kv_heads`` < ``num_heads`` is
    grouped-query attention (k and v hold ``num_kv_heads`` heads shared by groups of query heads).
    """
    G = num_kv_heads or num_heads
    if num_heads % G:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({G})")
    qk = FormSpec(
        "qk",
        a=FactorView(q, num_heads, transposed, *q_slice),  # W_q,h (d x head_dim)
        b=FactorView(k, G, transposed, *k_slice),  # W_k,h
    )
    ov = FormSpec(
        "ov",
        a=FactorView(o, num_heads, not transposed),  # W_o,h (d x head_dim)
        b=FactorView(v, G, transposed, *v_slice),  # W_v,h^T (d x head_dim)
    )
    return [qk, ov]


def register_attention_forms(module: nn.Module, specs: List[FormSpec]) -> nn.Module:
    """Declare ``specs`` (from :func:`attention_form_specs`) on an attention module; checks that they bind."""
    get = module_lookup(module)
    for spec in specs:
        bound = spec.bind(get)
        H, G = bound.A.shape[0], bound.B.shape[0]
        if bound.A.shape[2] != bound.B.shape[2] or H % G:
            raise ValueError(
                f"{spec.kind} form: factor shapes {tuple(bound.A.shape)} and {tuple(bound.B.shape)} do not pair"
            )
    setattr(module, ATTR, list(specs))
    return module


def clear_attention_forms(module: nn.Module) -> nn.Module:
    """Remove the forms :func:`register_attention_forms` declared on ``module`` (if any)."""
    module.__dict__.pop(ATTR, None)
    return module


def attention_forms(
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    o_weight: torch.Tensor,
    num_heads: int,
    num_kv_heads: Optional[int] = None,
    transposed: bool = False,
) -> dict:
    """Batched per-head views of an attention layer's forms, ``{"qk": BoundForm, "ov": BoundForm}``.

    ``qk``: ``A_h = W_q,h``, ``B_h = W_k,h`` so ``A_h B_h^T = W_q,h W_k,h^T`` (d x d); ``ov``: ``A_h = W_o,h``,
    ``B_h = W_v,h^T`` so ``A_h B_h^T = W_o,h W_v,h``. Views share storage with the weights (no copies).
    Biases are not part of the forms: a key bias only shifts scores by a per-query constant, and a value
    bias folds into the output bias (see :func:`fnl_transformers.core.attention.attention_spectral_init`).
    """
    weights = {"q": q_weight, "k": k_weight, "v": v_weight, "o": o_weight}
    for name, w in weights.items():
        if w.dim() != 2:
            raise ValueError(f"{name}_weight must be 2-D, got shape {tuple(w.shape)}")
    G = num_kv_heads or num_heads
    rows = lambda w, t: w.shape[1] if t else w.shape[0]  # noqa: E731
    _split(rows(q_weight, transposed), num_heads, "q_weight")
    _split(rows(k_weight, transposed), G, "k_weight")
    _split(rows(v_weight, transposed), G, "v_weight")
    _split(rows(o_weight, not transposed), num_heads, "o_weight")
    specs = attention_form_specs("q", "k", "v", "o", num_heads, num_kv_heads, transposed)
    return {spec.kind: spec.bind(weights.__getitem__) for spec in specs}
