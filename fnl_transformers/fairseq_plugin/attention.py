"""fairseq ``MultiheadAttention`` with reduced per-head dimensions, and per-head SI of its QK / OV forms.

Paper: Khodak et al., ICLR 2021, Sec. 4: each head's Query-Key form ``W_q,h W_k,h^T`` and Output-Value form
``W_o,h W_v,h`` have inner dimension ``head_dim``; shrinking it (QK and OV separately) compresses attention,
and SI makes the shrunken forms the best rank-r approximations of the dense ones.

:class:`ReducedHeadAttention` keeps fairseq's parameter names and layouts (``q_proj``, ``k_proj``: ``(heads *
head_dim_qk) x d``; ``v_proj``: ``(heads * head_dim_ov) x d``; ``out_proj``: ``d x (heads * head_dim_ov)``) and
fairseq's semantics (incremental decoding, static encoder keys, beam-size key sharing, padding and causal
masks), with two head dims, and the **original** score scaling ``1/sqrt(embed_dim / heads)`` (so SI is exact and
a zero-padded dense copy is the same function). It never takes the fused PyTorch fast path (which assumes one
head dim equal to ``embed_dim / heads``).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from fairseq import utils
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor, nn

from ..core import attention_form_specs, attention_spectral_init, register_attention_forms


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
        q = q * self.scaling  # ORIGINAL 1/sqrt(embed_dim / heads): SI stays exact

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
        return (f"num_heads={self.num_heads}, head_dim_qk={self.head_dim_qk}, head_dim_ov={self.head_dim_ov}, "
                f"scaling=1/sqrt({self.embed_dim // self.num_heads})")


def _linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _fresh_linear(like: nn.Linear, in_features: int, out_features: int, gain: float, zero_bias: bool) -> nn.Linear:
    """A new projection initialized as fairseq's ``MultiheadAttention.reset_parameters`` would at this size."""
    w = like.weight
    out = nn.Linear(in_features, out_features, bias=like.bias is not None, dtype=w.dtype, device=w.device)
    nn.init.xavier_uniform_(out.weight, gain=gain)
    if zero_bias and out.bias is not None:
        nn.init.constant_(out.bias, 0.0)
    return out


def check_attention(attn: MultiheadAttention, name: str) -> None:
    """Options of fairseq's attention that the factorized forms do not cover: one clear error each."""
    if attn.bias_k is not None or attn.add_zero_attn:
        raise ValueError(f"{name}: --add-bias-kv / --add-zero-attn are not supported with --head-dim or "
                         "--spectral-init-qk/-ov (the extra key/value is outside the QK/OV forms); drop them")
    if getattr(attn, "use_xformers", False):
        raise ValueError(f"{name}: xformers attention is not supported with --head-dim; drop --xformers-att-config")
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        if type(getattr(attn, proj)) is not nn.Linear:
            raise ValueError(f"{name}.{proj} is a {type(getattr(attn, proj)).__name__}, not an nn.Linear: "
                             "--head-dim and --spectral-init-qk/-ov need fairseq's plain projections")


def reduce_attention(
    attn: MultiheadAttention,
    head_dim_qk: Optional[int] = None,
    head_dim_ov: Optional[int] = None,
    spectral_init_qk: bool = False,
    spectral_init_ov: bool = False,
    name: str = "attention",
) -> MultiheadAttention:
    """Shrink ``attn``'s per-head QK and/or OV dimension in place (SI or fairseq's random init).

    ``None`` keeps a dimension. With SI the new projections are the per-head best rank-r approximations of the
    current ones (:func:`fnl_transformers.core.attention_spectral_init`, exact at full rank: key bias dropped
    (softmax-invariant), value bias folded into the output bias); without SI a shrunken part is re-initialized
    as fairseq initializes attention (xavier-uniform, gain ``1/sqrt(2)`` for q/k/v when q, k, v share a dim).
    If a dimension changes the module becomes a :class:`ReducedHeadAttention`.
    """
    check_attention(attn, name)
    H = attn.num_heads
    hd = attn.embed_dim // H
    dq = hd if head_dim_qk is None else head_dim_qk
    dv = hd if head_dim_ov is None else head_dim_ov
    for flag, d in (("--head-dim-qk", dq), ("--head-dim-ov", dv)):
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= hd:
            raise ValueError(
                f"{flag} {d} does not fit {name}: its heads have dimension {hd} (embed_dim {attn.embed_dim} / "
                f"{H} heads) and can only shrink; use an integer in [1, {hd}]"
            )
    if spectral_init_qk or spectral_init_ov:
        bias = lambda lin: None if lin.bias is None else lin.bias  # noqa: E731
        new = attention_spectral_init(
            attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.out_proj.weight, H,
            qk_rank=dq, ov_rank=dv, q_bias=bias(attn.q_proj), k_bias=bias(attn.k_proj), v_bias=bias(attn.v_proj),
            o_bias=bias(attn.out_proj),
        )
    gain = 1 / math.sqrt(2) if attn.qkv_same_dim else 1.0
    if spectral_init_qk:
        attn.q_proj = _linear(new["q_weight"], new["q_bias"])
        attn.k_proj = _linear(new["k_weight"], new["k_bias"])
    elif dq != hd:
        attn.k_proj = _fresh_linear(attn.k_proj, attn.kdim, H * dq, gain, zero_bias=False)
        attn.q_proj = _fresh_linear(attn.q_proj, attn.embed_dim, H * dq, gain, zero_bias=False)
    if spectral_init_ov:
        attn.v_proj = _linear(new["v_weight"], new["v_bias"])
        attn.out_proj = _linear(new["o_weight"], new["o_bias"])
    elif dv != hd:
        attn.v_proj = _fresh_linear(attn.v_proj, attn.vdim, H * dv, gain, zero_bias=False)
        attn.out_proj = _fresh_linear(attn.out_proj, H * dv, attn.embed_dim, 1.0, zero_bias=True)
    if dq != hd or dv != hd:
        attn.__class__ = ReducedHeadAttention
        attn.head_dim_qk, attn.head_dim_ov = dq, dv
        attn.head_dim = dq
        attn.skip_embed_dim_check = True  # fairseq's own flag for resized heads: never the fused fast path
        # attn.scaling is left at the original 1/sqrt(embed_dim / heads)
    return attn


def register_fairseq_attention_forms(attn: MultiheadAttention) -> None:
    """Declare the QK and OV forms of a fairseq attention module (views of q/k/v/out_proj weights)."""
    specs = attention_form_specs("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", attn.num_heads)
    register_attention_forms(attn, specs)
