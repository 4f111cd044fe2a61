"""Spectral initialization (SI): factors from the truncated SVD of an ordinary initialization.

Paper: Khodak, Tenenholtz, Mackey, Fusi, "Initialization and Regularization of Factorized Neural Layers",
ICLR 2021, Definition 3.1 (spectral initialization) and Sec. 2.3, Eq. (1) (attention heads as factorized forms).

Behaviour at the edges (all documented here, none silent):

* ``rank > min(m, n)`` (overcomplete) and singular values that are numerically zero (rank-deficient or
  all-zero weights): a factor pair ``(u_j, v_j)`` with ``u_j = v_j = 0`` never receives gradient (both
  gradients are products with the other, zero, factor). Such *dead* pairs are revived exactly: ``u_j = 0``
  and ``v_j`` is drawn from ``N(0, pad_std^2)``. The product ``U V^T`` is unchanged (still the best rank-r
  approximation), and ``u_j`` receives the gradient ``G v_j != 0`` at the first step.
* ``pad_std`` defaults to the root-mean-square entry of the kept ``V`` columns (or ``1/sqrt(n)`` when the
  whole weight is zero), so revived columns have the scale of live ones.
* SVDs are computed in float32 (float64 inputs stay float64); results are cast back to the weight's dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .rank import check_matrix, check_positive_int
from .settings import check_shrink


def _svd_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def numerical_rank_tol(s: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """numpy.linalg.matrix_rank's tolerance: ``max(m, n) * eps * s_max`` (last dim of ``s``)."""
    eps = torch.finfo(s.dtype).eps
    return max(m, n) * eps * s.amax(dim=-1, keepdim=True)


def _revive_dead_pairs(U, V, s, tol, pad_std, generator):
    """Columns whose singular value is (numerically) zero: ``u_j = 0``, ``v_j ~ N(0, pad_std^2)``."""
    dead = s <= tol  # (..., r)
    if not bool(dead.any()):
        return U, V
    if pad_std is None:
        live = V.masked_select(~dead.unsqueeze(-2).expand_as(V))
        pad_std = float(live.pow(2).mean().sqrt()) if live.numel() else 1.0 / math.sqrt(V.shape[-2])
        if pad_std == 0.0:
            pad_std = 1.0 / math.sqrt(V.shape[-2])
    # drawn on the generator's device (a CPU generator also seeds CUDA factors: the same draws on every device)
    where = generator.device if generator is not None else V.device
    noise = torch.randn(V.shape, generator=generator, dtype=V.dtype, device=where).to(V.device) * pad_std
    mask = dead.unsqueeze(-2)
    U = U.masked_fill(mask, 0.0)
    V = torch.where(mask.expand_as(V), noise, V)
    return U, V


def spectral_init(
    weight: torch.Tensor,
    rank: int,
    *,
    pad_std: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factors ``U (m x r)``, ``V (n x r)`` of ``weight (m x n)`` with ``U V^T`` its best rank-r approximation.

    ``U = U_r sqrt(S_r)``, ``V = V_r sqrt(S_r)`` (paper, Definition 3.1, SI). For ``rank > min(m, n)`` the extra
    columns, and columns of numerically zero singular values, are revived as described in the module docstring.
    """
    check_matrix("weight", weight)
    check_positive_int("rank", rank)
    m, n = weight.shape
    W = weight.detach().to(_svd_dtype(weight.dtype))
    Uf, s, Vh = torch.linalg.svd(W, full_matrices=False)  # W = Uf diag(s) Vh  (Eckart-Young)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    U = Uf[:, :k] * root  # U = U_r sqrt(S_r)
    V = Vh[:k].T * root  # V = V_r sqrt(S_r)
    s_k = s[:k]
    if rank > k:  # overcomplete: zero singular values for the extra columns
        U = torch.cat([U, U.new_zeros(m, rank - k)], dim=1)
        V = torch.cat([V, V.new_zeros(n, rank - k)], dim=1)
        s_k = torch.cat([s_k, s.new_zeros(rank - k)])
    tol = numerical_rank_tol(s, m, n) if s.numel() else s.new_zeros(1)
    U, V = _revive_dead_pairs(U, V, s_k, tol, pad_std, generator)
    return U.to(weight.dtype).contiguous(), V.to(weight.dtype).contiguous()


def tail_energy(weight: torch.Tensor, rank: int) -> float:
    """``sqrt(sum_{i > r} s_i^2)``: the Frobenius error of the best rank-r approximation (Eckart-Young)."""
    s = torch.linalg.svdvals(weight.detach().to(torch.float64))
    return float(s[rank:].pow(2).sum().sqrt())


def qr_core(A: torch.Tensor, B: torch.Tensor, with_q: bool = True):
    """``(C, Qa, Qb)`` with ``A_h B_h^T = Qa_h C_h Qb_h^T`` for batched factors ``A: H x m x k``, ``B: H x n x k``:
    thin QRs ``A_h = Qa Ra``, ``B_h = Qb Rb`` and the small core ``C_h = Ra Rb^T`` (at most k x k), which has the
    singular values of the m x n product at cost O(H (m + n) k^2). Computed in float32 (float64 stays float64);
    ``with_q=False`` skips the Q factors (``Qa = Qb = None``)."""
    dt = _svd_dtype(A.dtype)
    mode = "reduced" if with_q else "r"
    Qa, Ra = torch.linalg.qr(A.to(dt), mode=mode)
    Qb, Rb = torch.linalg.qr(B.to(dt), mode=mode)
    core = Ra @ Rb.transpose(-1, -2)
    return (core, Qa, Qb) if with_q else (core, None, None)


def head_spectral_init(
    A: torch.Tensor,
    B: torch.Tensor,
    rank: int,
    *,
    pad_std: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-head SI of batched forms ``A_h B_h^T`` (``A: H x m x k``, ``B: H x n x k``), without any m x n product.

    Thin QR ``A_h = Qa Ra``, ``B_h = Qb Rb``; SVD of the k x k core ``Ra Rb^T = Uc S Vc^T``; then
    ``A'_h = Qa Uc_r sqrt(S_r)``, ``B'_h = Qb Vc_r sqrt(S_r)`` so ``A'_h B'_h^T`` is the best rank-r
    approximation of ``A_h B_h^T`` (paper Sec. 2.3, Eq. (1): SI of each head's QK and OV form). Cost
    O(H (m + n) k^2).
    ``rank`` may not exceed ``k`` (the current per-head dimension): heads are only ever shrunk.
    """
    if A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"A and B must be batched (heads x dim x head_dim), got {tuple(A.shape)} and {tuple(B.shape)}")
    if A.shape[0] != B.shape[0] or A.shape[2] != B.shape[2]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} must share heads and head_dim")
    check_positive_int("rank", rank)
    H, m, k = A.shape
    n = B.shape[1]
    if rank > min(m, n):
        raise ValueError(f"rank must be <= min(dim_a, dim_b) = {min(m, n)}, got {rank}")
    check_shrink("reduced head dim (rank)", rank, k)  # heads only shrink
    core, Qa, Qb = qr_core(A.detach(), B.detach())
    Uc, s, Vch = torch.linalg.svd(core)  # A_h B_h^T = Qa (Ra Rb^T) Qb^T
    root = s[:, :rank].sqrt().unsqueeze(1)
    A2 = Qa @ (Uc[:, :, :rank] * root)  # A' = Qa Uc_r sqrt(S_r)
    B2 = Qb @ (Vch[:, :rank].transpose(1, 2) * root)  # B' = Qb Vc_r sqrt(S_r)
    tol = numerical_rank_tol(s, m, n)
    A2, B2 = _revive_dead_pairs(A2, B2, s[:, :rank], tol, pad_std, generator)
    return A2.to(A.dtype), B2.to(B.dtype)
