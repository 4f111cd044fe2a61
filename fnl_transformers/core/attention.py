"""Per-head spectral initialization of a multi-head attention layer, with exact bias handling.

Paper: Khodak et al., ICLR 2021, Sec. 4: each head's Query-Key product ``W_q,h W_k,h^T`` and Output-Value
product ``W_o,h W_v,h`` are factorized forms of inner dimension ``head_dim``; shrinking ``head_dim`` to ``r``
with SI replaces each form by its best rank-r approximation.

Biases are handled exactly, in ``nn.Linear`` layout (q/k/v weights ``(heads * head_dim) x d``, o ``d x
(heads * head_dim)``):

* The query bias is an extra input column: the QK form of head h is ``[W_q,h | b_q,h]^T W_k,h``, acting on
  ``[x, 1]``; SI of that (d + 1) x d form keeps it exact.
* The key bias adds ``(x W_q,h^T + b_q,h) . b_k,h`` to every score of a query, a per-query constant that the
  softmax ignores: it is dropped (returned as zeros).
* The value bias adds ``W_o,h b_v,h`` to every output (attention rows sum to one): it is folded into the
  output bias, ``b_o' = b_o + W_o b_v``, and returned as zeros.

The caller must keep the attention's original score scaling (``1/sqrt(original head_dim)``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .rank import check_matrix, check_positive_int
from .spectral import head_spectral_init


def _heads(name: str, rows: int, num_heads: int) -> int:
    if rows % num_heads:
        raise ValueError(f"{name}: {rows} features do not divide into num_heads={num_heads} heads")
    return rows // num_heads


def _check_rank(name: str, rank: Optional[int], head_dim: int) -> int:
    if rank is None:
        return head_dim
    check_positive_int(name, rank)
    if rank > head_dim:
        raise ValueError(f"{name} must be in [1, head_dim={head_dim}] (heads can only shrink), got {rank}")
    return rank


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
) -> Dict[str, Optional[torch.Tensor]]:
    """SI of every head's QK and OV form at per-head dimensions ``qk_rank`` and ``ov_rank`` (``None`` keeps the
    head dim and only balances the factors). Returns new ``{q,k,v,o}_{weight,bias}`` tensors (biases ``None``
    where none were given; ``o_bias`` is created when a value bias must be folded in)."""
    check_positive_int("num_heads", num_heads)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight), ("v_weight", v_weight), ("o_weight", o_weight)):
        check_matrix(name, w)
    if num_kv_heads not in (None, num_heads):
        raise ValueError(
            f"per-head SI needs one key/value head per query head; got num_kv_heads={num_kv_heads} for "
            f"num_heads={num_heads} (grouped-query attention shares K/V across heads, so its forms do not "
            "separate: keep head_dim, or FD only)"
        )
    H = num_heads
    d = q_weight.shape[1]
    dk = _heads("q_weight", q_weight.shape[0], H)
    if k_weight.shape != q_weight.shape:
        raise ValueError(f"k_weight shape {tuple(k_weight.shape)} must equal q_weight shape {tuple(q_weight.shape)}")
    dv = _heads("v_weight", v_weight.shape[0], H)
    if o_weight.shape[1] != v_weight.shape[0]:
        raise ValueError(f"o_weight must be d x {v_weight.shape[0]}, got {tuple(o_weight.shape)}")
    r_qk = _check_rank("qk_rank", qk_rank, dk)
    r_ov = _check_rank("ov_rank", ov_rank, dv)
    out: Dict[str, Optional[torch.Tensor]] = {}

    # QK: A_h = [W_q,h | b_q,h]^T ((d+1) x dk), B_h = W_k,h^T (d x dk); form A_h B_h^T
    Wq = q_weight.detach().reshape(H, dk, d)
    if q_bias is not None:
        Wq = torch.cat([Wq, q_bias.detach().reshape(H, dk, 1).to(Wq.dtype)], dim=2)
    A, B = head_spectral_init(Wq.transpose(1, 2), k_weight.detach().reshape(H, dk, d).transpose(1, 2), r_qk)
    out["q_weight"] = A[:, :d].transpose(1, 2).reshape(H * r_qk, d).contiguous()
    out["q_bias"] = None if q_bias is None else A[:, d].reshape(H * r_qk).contiguous()
    out["k_weight"] = B.transpose(1, 2).reshape(H * r_qk, d).contiguous()
    out["k_bias"] = None if k_bias is None else k_weight.new_zeros(H * r_qk)  # softmax-invariant: dropped

    # OV: A_h = W_o,h (d_out x dv), B_h = W_v,h^T (d x dv); b_o' = b_o + W_o b_v
    d_out = o_weight.shape[0]
    A, B = head_spectral_init(
        o_weight.detach().reshape(d_out, H, dv).permute(1, 0, 2), v_weight.detach().reshape(H, dv, d).transpose(1, 2),
        r_ov,
    )
    out["o_weight"] = A.permute(1, 0, 2).reshape(d_out, H * r_ov).contiguous()
    out["v_weight"] = B.transpose(1, 2).reshape(H * r_ov, d).contiguous()
    out["v_bias"] = None if v_bias is None else v_weight.new_zeros(H * r_ov)
    dt = torch.float64 if o_weight.dtype == torch.float64 else torch.float32  # float64 inputs stay float64
    folded = None if v_bias is None else (o_weight.detach().to(dt) @ v_bias.detach().to(dt)).to(o_weight.dtype)
    if o_bias is None:
        out["o_bias"] = folded
    else:
        out["o_bias"] = o_bias.detach().clone() if folded is None else o_bias.detach() + folded
    return out
