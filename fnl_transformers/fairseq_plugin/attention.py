"""fairseq ``MultiheadAttention`` with reduced per-head dimensions, and per-head SI of its QK / OV forms.

Paper: Khodak et al., ICLR 2021, Sec. 2.3, Eq. (1): each head's Query-Key form ``W_q,h W_k,h^T`` and Output-Value
form ``W_o,h W_v,h`` have inner dimension ``head_dim``; shrinking it (QK and OV separately) compresses attention,
and SI (Definition 3.1) makes the shrunken forms the best rank-r approximations of the dense ones. The surgery
itself is the core's (:func:`~fnl_transformers.core.shrink_heads`); this module maps fairseq's names and layouts.

:class:`ReducedHeadAttention` keeps fairseq's parameter names and layouts (``q_proj``, ``k_proj``: ``(heads *
head_dim_qk) x d``; ``v_proj``: ``(heads * head_dim_ov) x d``; ``out_proj``: ``d x (heads * head_dim_ov)``) and
fairseq's semantics (incremental decoding, static encoder keys, beam-size key sharing, padding and causal
masks), with two head dims, and by default the **original** score scaling ``1/sqrt(embed_dim / heads)`` (so SI is
exact and a zero-padded dense copy is the same function); under ``--reduced-heads fresh`` (the official code's
rule) ``1/sqrt(head_dim_qk)``, which recompose folds into the padded query. It never takes the fused PyTorch
fast path (which assumes one head dim equal to ``embed_dim / heads``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, Optional, Tuple

import torch
from fairseq import utils
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor, nn

from ..core import (
    HeadDims,
    StructureSpec,
    attention_form_specs,
    form_param_counts,
    register_attention_forms,
    shrink_heads,
)
from ..core.heads import FreshInit, Tensors


class ReducedHeadAttention(MultiheadAttention):
    """``MultiheadAttention`` whose heads have ``head_dim_qk`` (queries/keys) and ``head_dim_ov`` (values/output)
    dimensions. Made from a dense module by :func:`reduce_attention` (the module's class is switched in place,
    so dropout, flags and incremental-state ids are kept)."""

    head_dim_qk: int
    head_dim_ov: int

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        # Same steps as fairseq's MultiheadAttention.forward (non-fused path), with q/k of head dim
        # head_dim_qk and v of head dim head_dim_ov.
        if need_head_weights:
            need_weights = True
        H, dq, dv = self.num_heads, self.head_dim_qk, self.head_dim_ov
        tgt_len, bsz, _ = query.size()
        src_len = tgt_len

        if incremental_state is not None:
            saved_state = self._get_input_buffer(incremental_state)
            if saved_state is not None and "prev_key" in saved_state and static_kv:
                key = value = None  # encoder keys/values cached
        else:
            saved_state = None

        q = self.q_proj(query)
        if self.self_attention:
            k, v = self.k_proj(query), self.v_proj(query)
        elif key is None:
            assert value is None
            k = v = None
        else:
            if self.encoder_decoder_attention and self.beam_size > 1 and bsz == key.size(1):
                # key is [T, bsz*beam_size, C]: beams share the encoder output, keep one copy
                key = key.view(key.size(0), -1, self.beam_size, key.size(2))[:, :, 0, :]
                if key_padding_mask is not None:
                    key_padding_mask = key_padding_mask.view(-1, self.beam_size, key_padding_mask.size(1))[:, 0, :]
            k = self.k_proj(key)
            v = self.v_proj(key if self.encoder_decoder_attention else value)
        q = q * self.scaling  # 1/sqrt(score head dim): the original one keeps SI exact

        q = q.contiguous().view(tgt_len, bsz * H, dq).transpose(0, 1)
        kv_bsz = bsz
        if k is not None:
            kv_bsz = k.size(1)
            k = k.contiguous().view(-1, kv_bsz * H, dq).transpose(0, 1)
        if v is not None:
            v = v.contiguous().view(-1, kv_bsz * H, dv).transpose(0, 1)

        if saved_state is not None:
            # saved states are (bsz, heads, seq_len, head_dim), as in fairseq
            if "prev_key" in saved_state:
                prev_key = saved_state["prev_key"]
                assert prev_key is not None
                kv_bsz = prev_key.size(0)
                prev_key = prev_key.view(kv_bsz * H, -1, dq)
                k = prev_key if static_kv else torch.cat([prev_key, k], dim=1)
                src_len = k.size(1)
            if "prev_value" in saved_state:
                prev_value = saved_state["prev_value"]
                assert prev_value is not None
                prev_value = prev_value.view(kv_bsz * H, -1, dv)
                v = prev_value if static_kv else torch.cat([prev_value, v], dim=1)
            prev_key_padding_mask = saved_state.get("prev_key_padding_mask")
            assert k is not None and v is not None
            key_padding_mask = MultiheadAttention._append_prev_key_padding_mask(
                key_padding_mask=key_padding_mask,
                prev_key_padding_mask=prev_key_padding_mask,
                batch_size=kv_bsz,
                src_len=k.size(1),
                static_kv=static_kv,
            )
            saved_state["prev_key"] = k.view(kv_bsz, H, -1, dq)
            saved_state["prev_value"] = v.view(kv_bsz, H, -1, dv)
            saved_state["prev_key_padding_mask"] = key_padding_mask
            incremental_state = self._set_input_buffer(incremental_state, saved_state)
        assert k is not None and v is not None
        src_len = k.size(1)
        if key_padding_mask is not None and key_padding_mask.dim() == 0:
            key_padding_mask = None

        if self.encoder_decoder_attention and bsz != kv_bsz:
            attn_weights = torch.einsum(
                "bxhtd,bhsd->bxhts", q.view((kv_bsz, -1, H) + q.size()[1:]), k.view((kv_bsz, H) + k.size()[1:])
            ).reshape(-1, tgt_len, src_len)
        else:
            attn_weights = torch.bmm(q, k.transpose(1, 2))
        attn_weights = self.apply_sparse_mask(attn_weights, tgt_len, src_len, bsz)
        if attn_mask is not None:
            attn_weights = attn_weights + attn_mask.unsqueeze(0)
        if key_padding_mask is not None:
            attn_weights = attn_weights.view(kv_bsz, -1, H, tgt_len, src_len)
            attn_weights = attn_weights.masked_fill(
                key_padding_mask.unsqueeze(1).unsqueeze(2).unsqueeze(3).to(torch.bool), float("-inf")
            )
            attn_weights = attn_weights.view(bsz * H, tgt_len, src_len)
        if before_softmax:
            return attn_weights, v

        attn_weights_float = utils.softmax(attn_weights, dim=-1, onnx_trace=self.onnx_trace)
        attn_probs = self.dropout_module(attn_weights_float.type_as(attn_weights))
        if self.encoder_decoder_attention and bsz != kv_bsz:
            attn = torch.einsum(
                "bxhts,bhsd->bxhtd",
                attn_probs.view((kv_bsz, -1, H) + attn_probs.size()[1:]),
                v.view((kv_bsz, H) + v.size()[1:]),
            ).reshape(-1, tgt_len, dv)
        else:
            attn = torch.bmm(attn_probs, v)
        attn = attn.transpose(0, 1).contiguous().view(tgt_len, bsz, H * dv)
        attn = self.out_proj(attn)
        weights: Optional[Tensor] = None
        if need_weights:
            weights = attn_weights_float.view(bsz, H, tgt_len, src_len).transpose(1, 0)
            if not need_head_weights:
                weights = weights.mean(dim=0)
        return attn, weights

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim_qk={self.head_dim_qk}, head_dim_ov={self.head_dim_ov}, "
            f"scaling=1/sqrt({round(self.scaling**-2)})"
        )


def _linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}


def read_projections(attn: MultiheadAttention) -> Tensors:
    """``{q,k,v,o}_{weight,bias}`` of a fairseq attention module (``nn.Linear`` layout, detached)."""
    out: Tensors = {}
    for key, proj in PROJ.items():
        lin = getattr(attn, proj)
        out[f"{key}_weight"] = lin.weight.detach()
        out[f"{key}_bias"] = None if lin.bias is None else lin.bias.detach()
    return out


def check_attention(attn: MultiheadAttention, name: str) -> None:
    """Options of fairseq's attention that the factorized forms do not cover: one clear error each."""
    if attn.bias_k is not None or attn.add_zero_attn:
        raise ValueError(
            f"{name}: --add-bias-kv / --add-zero-attn are not supported with --head-dim or "
            "--spectral-init-qk/-ov (the extra key/value is outside the QK/OV forms); drop them"
        )
    if getattr(attn, "use_xformers", False):
        raise ValueError(f"{name}: xformers attention is not supported with --head-dim; drop --xformers-att-config")
    for proj in PROJ.values():
        if type(getattr(attn, proj)) is not nn.Linear:
            raise ValueError(
                f"{name}.{proj} is a {type(getattr(attn, proj)).__name__}, not an nn.Linear: "
                "--head-dim and --spectral-init-qk/-ov need fairseq's plain projections"
            )


def head_dims(attn: MultiheadAttention) -> HeadDims:
    """The per-head dims of a (possibly reduced) fairseq attention module."""
    hd = attn.embed_dim // attn.num_heads
    return HeadDims(
        attn.num_heads, attn.num_heads, hd, getattr(attn, "head_dim_qk", hd), getattr(attn, "head_dim_ov", hd)
    )


def reduce_attention(
    attn: MultiheadAttention, structure: StructureSpec, name: str = "attention", fresh: Optional[FreshInit] = None
) -> int:
    """Resize ``attn``'s heads in place as ``structure`` says (its head dims, per-head initialization and score
    scaling, core :meth:`~fnl_transformers.core.StructureSpec.head_dims` / ``head_init`` / ``score_head_dim``);
    returns the parameters removed. ``fresh``: the model's initialization of new projections (random heads).

    Spectral init is exact at full rank (key bias dropped, softmax-invariant; value bias folded into the output
    bias). If a dimension changes the module becomes a :class:`ReducedHeadAttention`, whose scores are scaled by
    ``1/sqrt(d)``, ``d = score_head_dim`` (the original head dim, or the reduced QK dim under
    ``--reduced-heads fresh``)."""
    full = head_dims(attn)
    qk, ov = structure.head_dims(full.head_dim, where=name)
    dims = replace(full, qk=qk, ov=ov)
    init = {form: structure.head_init(form, dims.shrinks(form)) for form in ("qk", "ov")}
    if not dims.changed and init["qk"] is None and init["ov"] is None:
        return 0
    check_attention(attn, name)
    t = read_projections(attn)
    new = shrink_heads(t, dims, init["qk"], init["ov"], fresh=fresh)
    for key, proj in PROJ.items():
        if new[f"{key}_weight"] is not t[f"{key}_weight"]:
            setattr(attn, proj, _linear(new[f"{key}_weight"], new[f"{key}_bias"]))
    if dims.changed:
        attn.__class__ = ReducedHeadAttention
        attn.head_dim_qk, attn.head_dim_ov = dims.qk, dims.ov
        attn.head_dim = dims.qk
        attn.skip_embed_dim_check = True  # fairseq's own flag for resized heads: never the fused fast path
        attn.scaling = structure.score_head_dim(full.head_dim, dims.qk) ** -0.5
    counts = lambda d: sum(form_param_counts(t, d).values())  # noqa: E731
    return counts(full) - counts(dims)


def register_fairseq_attention_forms(attn: MultiheadAttention) -> None:
    """Declare the QK and OV forms of a fairseq attention module (views of q/k/v/out_proj weights)."""
    specs = attention_form_specs("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", attn.num_heads)
    register_attention_forms(attn, specs)
