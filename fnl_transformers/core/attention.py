"""Per-head spectral initialization of a multi-head attention layer, with exact bias handling.

Paper: Khodak et al., ICLR 2021, Sec. 2.3, Eq. (1): each head's Query-Key product ``W_q,h W_k,h^T`` and
Output-Value product ``W_o,h W_v,h`` are factorized forms of inner dimension ``head_dim``; shrinking ``head_dim``
to ``r`` with SI (Definition 3.1) replaces each form by its best rank-r approximation.

The per-head factors are read and written through the forms' views (:func:`~fnl_transformers.core.attention_forms`,
``nn.Linear`` layout: q/k/v weights ``(heads * head_dim) x d``, o ``d x (heads * head_dim)``). Biases are handled
exactly:

* The query bias is an extra input column: the QK form of head h is ``[W_q,h | b_q,h]^T W_k,h``, acting on
  ``[x, 1]``; SI of that (d + 1) x d form keeps it exact.
* The key bias adds ``(x W_q,h^T + b_q,h) . b_k,h`` to every score of a query, a per-query constant that the
  softmax ignores: it is dropped (returned as zeros).
* The value bias adds ``W_o,h b_v,h`` to every output (attention rows sum to one): it is folded into the
  output bias, ``b_o' = b_o + W_o b_v``, and returned as zeros.

The caller must keep the attention's original score scaling (``1/sqrt(original head_dim)``).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from .forms import FactorView, attention_form_specs, attention_forms
from .rank import check_matrix, check_positive_int
from .settings import check_shrink
from .spectral import head_spectral_init


def _write(view: FactorView, rows: int, cols: int, heads_value: torch.Tensor) -> torch.Tensor:
    """A new ``rows x cols`` tensor (``view``'s layout) whose per-head view equals ``heads_value``."""
    out = heads_value.new_empty(rows, cols) if not view.transpose else heads_value.new_empty(cols, rows)
    view.view(out).copy_(heads_value)
    return out


def attention_spectral_init(
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    o_weight: torch.Tensor,
    num_heads: int,
    qk_rank: Optional[int] = None,
    ov_rank: Optional[int] = None,
    q_bias: Optional[torch.Tensor] = None,
    k_bias: Optional[torch.Tensor] = None,
    v_bias: Optional[torch.Tensor] = None,
    o_bias: Optional[torch.Tensor] = None,
    num_kv_heads: Optional[int] = None,
    forms: Sequence[str] = ("qk", "ov"),
) -> Dict[str, Optional[torch.Tensor]]:
    """SI of every head's QK and OV form at per-head dimensions ``qk_rank`` and ``ov_rank`` (``None`` keeps the
    head dim and only balances the factors). Returns new ``{q,k,v,o}_{weight,bias}`` tensors of the ``forms``
    computed (QK: q/k; OV: v/o; biases ``None`` where none were given; ``o_bias`` is created when a value bias
    must be folded in)."""
    check_positive_int("num_heads", num_heads)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight), ("v_weight", v_weight), ("o_weight", o_weight)):
        check_matrix(name, w)
    if num_kv_heads not in (None, num_heads):
        raise ValueError(
            f"per-head SI needs one key/value head per query head; got num_kv_heads={num_kv_heads} for "
            f"num_heads={num_heads} (grouped-query attention shares K/V across heads, so its forms do not "
            "separate: keep head_dim, or FD only)"
        )
    if k_weight.shape != q_weight.shape:
        raise ValueError(f"k_weight shape {tuple(k_weight.shape)} must equal q_weight shape {tuple(q_weight.shape)}")
    if o_weight.shape[1] != v_weight.shape[0]:
        raise ValueError(f"o_weight must be d x {v_weight.shape[0]}, got {tuple(o_weight.shape)}")
    H = num_heads
    views = attention_forms(q_weight.detach(), k_weight.detach(), v_weight.detach(), o_weight.detach(), H)
    qk_spec, ov_spec = attention_form_specs("q", "k", "v", "o", H)
    out: Dict[str, Optional[torch.Tensor]] = {}

    if "qk" in forms:
        f = views["qk"]  # A_h = W_q,h^T (d x dk), B_h = W_k,h^T (d x dk)
        d, dk = f.A.shape[1], f.A.shape[2]
        r = dk if qk_rank is None else check_shrink("qk_rank", qk_rank, dk)
        A = f.A
        if q_bias is not None:  # [W_q,h | b_q,h]^T: the bias is one more input row of A_h
            A = torch.cat([A, qk_spec.a.view(q_bias.detach().reshape(-1, 1)).to(A.dtype)], dim=1)
        A2, B2 = head_spectral_init(A, f.B, r)
        out["q_weight"] = _write(qk_spec.a, H * r, d, A2[:, :d])
        out["q_bias"] = None if q_bias is None else _write(qk_spec.a, H * r, 1, A2[:, d:]).reshape(-1)
        out["k_weight"] = _write(qk_spec.b, H * r, d, B2)
        out["k_bias"] = None if k_bias is None else k_weight.new_zeros(H * r)  # softmax-invariant: dropped

    if "ov" in forms:
        f = views["ov"]  # A_h = W_o,h (d_out x dv), B_h = W_v,h^T (d x dv)
        d_out, d, dv = f.A.shape[1], f.B.shape[1], f.A.shape[2]
        r = dv if ov_rank is None else check_shrink("ov_rank", ov_rank, dv)
        A2, B2 = head_spectral_init(f.A, f.B, r)
        out["o_weight"] = _write(ov_spec.a, H * r, d_out, A2)
        out["v_weight"] = _write(ov_spec.b, H * r, d, B2)
        out["v_bias"] = None if v_bias is None else v_weight.new_zeros(H * r)
        dt = torch.float64 if o_weight.dtype == torch.float64 else torch.float32  # float64 inputs stay float64
        folded = None if v_bias is None else (o_weight.detach().to(dt) @ v_bias.detach().to(dt)).to(o_weight.dtype)
        if o_bias is None:
            out["o_bias"] = folded
        else:
            out["o_bias"] = o_bias.detach().clone() if folded is None else o_bias.detach() + folded
    return out
