"""Per-architecture adapters: where each supported HF model keeps its attention projections, head-size
attributes and feed-forward layers, and how to read/write the projections in ``nn.Linear`` layout.

The math (per-head SI, bias folding, forms) is the core's; an adapter only maps names and layouts:

* ``read(attention, dims)`` returns ``{q,k,v,o}_{weight,bias}`` in ``nn.Linear`` layout (q/k/v ``(heads*hd) x d``,
  o ``d x (heads*hd)``), the layout of :func:`fnl_transformers.core.attention_spectral_init`.
* ``write(attention, tensors, dims)`` installs projections of the given per-head dims (zero-padding per head to
  one common width when QK and OV dims differ, see :mod:`.layers`) and updates the head-size attributes the
  attention forward reshapes with. The attention's ``scaling`` attribute is not touched here: by default the
  reduced model keeps the original ``1/sqrt(head_dim)``, so it is exactly the per-head truncation.
* ``form_specs(dims)``: the QK/OV form specs (core :func:`~fnl_transformers.core.attention_form_specs`).
* ``scale_scores(attention, factor)``: the attention's ``scaling`` times ``factor`` (heads scored by
  ``1/sqrt(reduced head dim)``, ``reduced_heads='fresh'``); ``position_modules(model)``: the learned position
  embedding tables (part ``position``).

Supported: BERT, RoBERTa, DistilBERT, GPT-2 and the Llama layout (Llama, Mistral, Qwen2: RoPE, grouped-query
attention). To add an architecture, add an :class:`Arch` (or a subclass for a fused layout) to :data:`ARCHS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core import FormSpec, HeadDims, attention_form_specs
from .layers import HeadPaddedConv1D, HeadPaddedLinear, HeadSlicedConv1D, HeadSlicedLinear


def padded_width(dims: HeadDims) -> int:
    """The one per-head width an attention forward reshapes q, k and v with (the larger of the QK and OV dims)."""
    return max(dims.qk, dims.ov)


@dataclass(frozen=True)
class Arch:
    """Names of an architecture with separate ``nn.Linear`` q/k/v/o projections."""

    name: str
    model_types: Tuple[str, ...]
    attention: str  # regex over qualified module names of attention modules
    q: str  # module paths relative to the attention module
    k: str
    v: str
    o: str
    head_owner: str  # module (relative path, "" = the attention module) holding the head-size attributes
    head_dim_attr: str  # per-head size used to reshape q/k/v in the forward
    total_attr: Optional[str]  # heads * head size attribute, if any
    ffn: str  # regex over qualified module names of feed-forward layers
    rope: bool = False  # rotary position embeddings act on q/k inside each head
    position: Optional[str] = None  # regex over qualified module names of learned position embedding tables

    def num_heads(self, config) -> Tuple[int, int]:
        heads = config.num_attention_heads
        return heads, getattr(config, "num_key_value_heads", None) or heads

    def check_model(self, model: nn.Module) -> None:
        """Raise for model features this adapter does not handle."""

    def attention_modules(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        pattern = re.compile(self.attention)
        return [(n, m) for n, m in model.named_modules() if n and pattern.search(n)]

    def ffn_modules(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        pattern = re.compile(self.ffn)
        return [(n, m) for n, m in model.named_modules() if n and pattern.search(n)]

    # --- projections in nn.Linear layout ------------------------------------------------------------------
    def original_head_dim(self, att: nn.Module, heads: int) -> int:
        return att.get_submodule(self.q).out_features // heads

    def read(self, att: nn.Module, dims: HeadDims) -> Dict[str, Optional[torch.Tensor]]:
        """The current q/k/v/o weights and biases (detached views) in ``nn.Linear`` layout."""
        out = {}
        for key in "qkvo":
            lin = att.get_submodule(getattr(self, key))
            out[f"{key}_weight"] = lin.weight.detach()
            out[f"{key}_bias"] = None if lin.bias is None else lin.bias.detach()
        return out

    def write(self, att: nn.Module, t: Dict[str, Optional[torch.Tensor]], dims: HeadDims) -> None:
        """Install q/k/v/o for ``dims`` with values ``t`` (``nn.Linear`` layout; any missing entry keeps the
        fresh initialization of the new layer) and set the head-size attributes."""
        H, G, W = dims.heads, dims.kv_heads, padded_width(dims)
        ref = att.get_submodule(self.q).weight
        kw = dict(dtype=ref.dtype, device=ref.device)
        d_in, d_out = ref.shape[1], att.get_submodule(self.o).out_features
        bias = {key: att.get_submodule(getattr(self, key)).bias is not None for key in "qkvo"}
        if t.get("o_bias") is not None:
            bias["o"] = True
        new = {
            "q": _padded(d_in, H, dims.qk, W, bias["q"], kw),
            "k": _padded(d_in, G, dims.qk, W, bias["k"], kw),
            "v": _padded(d_in, G, dims.ov, W, bias["v"], kw),
            "o": _sliced(H, dims.ov, W, d_out, bias["o"], kw),
        }
        for key, layer in new.items():
            _copy_into(layer, t.get(f"{key}_weight"), t.get(f"{key}_bias"))
            set_submodule(att, getattr(self, key), layer)
        self.set_head_dim(att, W, H)

    def scale_scores(self, att: nn.Module, factor: float) -> None:
        """Multiply the attention's score scaling (its ``scaling`` attribute, read by the forward) by ``factor``."""
        owner = att.get_submodule(self.head_owner) if self.head_owner else att
        owner.scaling = owner.scaling * factor

    def position_modules(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        """``(name, nn.Embedding)`` of the learned position embedding tables (none for rotary positions)."""
        if self.position is None:
            return []
        pattern = re.compile(self.position)
        return [(n, m) for n, m in model.named_modules() if n and pattern.search(n)]

    def set_head_dim(self, att: nn.Module, width: int, heads: int) -> None:
        owner = att.get_submodule(self.head_owner) if self.head_owner else att
        setattr(owner, self.head_dim_attr, width)
        if self.total_attr:
            setattr(owner, self.total_attr, heads * width)

    def form_specs(self, dims: HeadDims) -> List[FormSpec]:
        return attention_form_specs(
            f"{self.q}.weight",
            f"{self.k}.weight",
            f"{self.v}.weight",
            f"{self.o}.weight",
            dims.heads,
            num_kv_heads=dims.kv_heads if dims.kv_heads != dims.heads else None,
        )

    # --- feed-forward layers --------------------------------------------------------------------------------
    def linear_weight(self, layer: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(weight in nn.Linear layout, bias)`` of a dense FFN layer."""
        if isinstance(layer, nn.Linear):
            return layer.weight, layer.bias
        raise TypeError(f"{self.name}: expected an nn.Linear feed-forward layer, got {type(layer).__name__}")


class GPT2Arch(Arch):
    """GPT-2: fused ``c_attn`` and ``c_proj`` are ``Conv1D`` (weight ``in x out``, the transpose of nn.Linear)."""

    def original_head_dim(self, att: nn.Module, heads: int) -> int:
        return att.c_proj.weight.shape[0] // heads

    def check_model(self, model: nn.Module) -> None:
        if getattr(model.config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported by patch_model")

    def read(self, att: nn.Module, dims: HeadDims) -> Dict[str, Optional[torch.Tensor]]:
        H = dims.heads
        W, b = att.c_attn.weight.detach(), att.c_attn.bias.detach()
        out, start = {}, 0
        for key, inner in zip("qkv", (dims.qk, dims.qk, dims.ov)):
            out[f"{key}_weight"] = W[:, start : start + H * inner].t()
            out[f"{key}_bias"] = b[start : start + H * inner]
            start += H * inner
        out["o_weight"] = att.c_proj.weight.detach().t()
        out["o_bias"] = att.c_proj.bias.detach()
        return out

    def write(self, att: nn.Module, t: Dict[str, Optional[torch.Tensor]], dims: HeadDims) -> None:
        H, W = dims.heads, padded_width(dims)
        ref = att.c_attn.weight
        d, d_out = ref.shape[0], att.c_proj.weight.shape[1]
        inners = (dims.qk, dims.qk, dims.ov)
        c_attn = Conv1D(H * sum(inners), d) if all(i == W for i in inners) else HeadPaddedConv1D(d, H, inners, W)
        c_proj = Conv1D(d_out, H * dims.ov) if dims.ov == W else HeadSlicedConv1D(H, dims.ov, W, d_out)
        c_attn.to(dtype=ref.dtype, device=ref.device)
        c_proj.to(dtype=ref.dtype, device=ref.device)
        with torch.no_grad():  # copy the given sections; missing ones keep the fresh initialization
            start = 0
            for key, inner in zip("qkv", inners):
                stop = start + H * inner
                if t.get(f"{key}_weight") is not None:
                    c_attn.weight[:, start:stop] = t[f"{key}_weight"].t()
                if t.get(f"{key}_bias") is not None:
                    c_attn.bias[start:stop] = t[f"{key}_bias"]
                start = stop
            _copy_into(c_proj, None if t.get("o_weight") is None else t["o_weight"].t(), t.get("o_bias"))
        att.c_attn, att.c_proj = c_attn, c_proj
        self.set_head_dim(att, W, H)

    def form_specs(self, dims: HeadDims) -> List[FormSpec]:
        H, qk, ov = dims.heads, dims.qk, dims.ov
        return attention_form_specs(
            "c_attn.weight",
            "c_attn.weight",
            "c_attn.weight",
            "c_proj.weight",
            H,
            transposed=True,
            q_slice=(0, H * qk),
            k_slice=(H * qk, 2 * H * qk),
            v_slice=(2 * H * qk, 2 * H * qk + H * ov),
        )

    def linear_weight(self, layer: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(layer, Conv1D):
            return layer.weight.t(), layer.bias
        return super().linear_weight(layer)


_BERT = dict(
    attention=r"(^|\.)layer\.\d+\.(attention|crossattention)$",
    q="self.query",
    k="self.key",
    v="self.value",
    o="output.dense",
    head_owner="self",
    head_dim_attr="attention_head_size",
    total_attr="all_head_size",
    ffn=r"(^|\.)layer\.\d+\.(intermediate|output)\.dense$",
    position=r"(^|\.)embeddings\.position_embeddings$",
)

ARCHS: Dict[str, Arch] = {
    "bert": Arch("bert", ("bert",), **_BERT),
    "roberta": Arch("roberta", ("roberta",), **_BERT),
    "distilbert": Arch(
        "distilbert",
        ("distilbert",),
        attention=r"(^|\.)transformer\.layer\.\d+\.attention$",
        q="q_lin",
        k="k_lin",
        v="v_lin",
        o="out_lin",
        head_owner="",
        head_dim_attr="attention_head_size",
        total_attr=None,
        ffn=r"(^|\.)transformer\.layer\.\d+\.ffn\.lin[12]$",
        position=r"(^|\.)embeddings\.position_embeddings$",
    ),
    "gpt2": GPT2Arch(
        "gpt2",
        ("gpt2",),
        attention=r"(^|\.)h\.\d+\.attn$",
        q="c_attn",
        k="c_attn",
        v="c_attn",
        o="c_proj",
        head_owner="",
        head_dim_attr="head_dim",
        total_attr="split_size",
        ffn=r"(^|\.)h\.\d+\.mlp\.c_(fc|proj)$",
        position=r"(^|\.)wpe$",
    ),
    "llama": Arch(
        "llama",
        ("llama", "mistral", "qwen2"),
        attention=r"(^|\.)layers\.\d+\.self_attn$",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        o="o_proj",
        head_owner="",
        head_dim_attr="head_dim",
        total_attr=None,
        ffn=r"(^|\.)layers\.\d+\.mlp\.(gate|up|down)_proj$",
        rope=True,
    ),
}


def arch_for(model: nn.Module) -> Arch:
    """The adapter for ``model`` (by ``model.config.model_type``); unsupported types get an error listing ours."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHS.values():
        if model_type in arch.model_types:
            arch.check_model(model)
            return arch
    supported = sorted(t for a in ARCHS.values() for t in a.model_types)
    raise ValueError(
        f"patch_model does not support model_type {model_type!r} ({type(model).__name__}); supported model types: "
        f"{', '.join(supported)}"
    )


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` of ``root`` by ``module``."""
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _padded(d_in: int, heads: int, inner: int, outer: int, bias: bool, kw: dict) -> nn.Linear:
    if inner == outer:
        return nn.Linear(d_in, heads * inner, bias=bias, **kw)
    return HeadPaddedLinear(d_in, heads, inner, outer, bias, **kw)


def _sliced(heads: int, inner: int, outer: int, d_out: int, bias: bool, kw: dict) -> nn.Linear:
    if inner == outer:
        return nn.Linear(heads * inner, d_out, bias=bias, **kw)
    return HeadSlicedLinear(heads, inner, outer, d_out, bias, **kw)


def _copy_into(layer: nn.Module, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    with torch.no_grad():
        if weight is not None:
            layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
