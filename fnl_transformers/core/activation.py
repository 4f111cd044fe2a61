"""Activation-aware truncation: spectral initialization in the norm of a layer's outputs on calibration inputs.

SI (paper Definition 3.1) replaces a pretrained weight ``W`` (``m x n``, ``y = x W^T``) by its best rank-r
approximation in the Frobenius norm, which is the output error of the layer on *white* inputs
(``E[x x^T] = I``). On real inputs with second-moment matrix ``C = E[x x^T]`` the output error is

    ``E ||x (W - W')^T||^2 = tr((W - W') C (W - W')^T) = ||(W - W') S||_F^2``  with ``S S^T = C``,

so the best rank-r ``W'`` is ``[W S]_r S^{-1}`` (``[.]_r``: truncated SVD) and its error is the tail energy of the
*scaled* matrix, ``||(W - W') S||_F^2 = sum_{i > r} s_i(W S)^2``: the optimality statement of SI (Eckart-Young)
with ``W`` replaced by ``W S``. This is the whitening of SVD-LLM; ASVD's diagonal scaling is the case of a
diagonal ``C``. The same holds

* for an embedding table ``E`` (``vocab x d``) with token frequencies ``p_i`` (the second moment of one-hot
  inputs is ``diag(p)``): the best rank-r ``E'`` minimizes ``sum_i p_i ||E_i - E'_i||^2``
  (:func:`embedding_activation_init`);
* for attention heads (paper Sec. 2.3, Eq. (1)): the OV form ``W_o,h W_v,h`` acts on the attention input ``x``
  (or, exactly, on the attention-weighted average of the inputs, whose per-head statistics may be given), and
  the QK form ``[W_q,h | b_q,h]^T W_k,h`` is read by a query ``[x_i, 1]`` on one side and a key ``x_j`` on the
  other, so with independent query and key positions the score error is ``||S_q^T (M - M') S_k||_F`` and the
  best rank-r form is ``S_q^{-T} [S_q^T M S_k]_r S_k^{-1}`` (:func:`attention_activation_init`: per-head SI of
  the scaled forms, then unscaled).

Damping (stated once, used everywhere): ``C`` is often singular (fewer calibration tokens than features, features
that never fire, tokens never seen), so the scaling uses ``C_d = C + damping * mean(diag C) * I`` (default
``damping = 0.01``, GPTQ's choice). The statement above then holds exactly for ``C_d``: the objective minimized is
``E ||x dW^T||^2 + damping * mean(diag C) * ||dW||_F^2``, activation-weighted plus a little weight-only SI, which
keeps the input directions the calibration data never visited. ``damping = 0`` is allowed when ``C`` is
positive definite (else one clear error). An all-zero ``C`` (a layer the calibration never reached) falls back
to weight-only SI. Factors are returned balanced (``U = U_r sqrt(S_r)``, ``V = V_r sqrt(S_r)`` of the truncated
weight's own SVD), as SI returns them.

Reported errors (:class:`FitErrors`): ``rel_error``, the relative error of the minimized (damped) objective,
``sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)`` of the scaled matrix; ``output_rel_error``, the relative output error on the
calibration inputs themselves (undamped ``C``); ``weight_rel_error``, ``||W - W'||_F / ||W||_F`` (SI's number).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch

from .attention import attention_spectral_init
from .rank import check_matrix, check_positive_int
from .settings import DEFAULT_DAMPING, check_damping
from .spectral import head_spectral_init, spectral_init


# ----------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------
class InputStats:
    """Running sums of a layer's inputs ``x`` (``n`` features): ``sum x x^T`` (float64), ``sum x`` and the count.

    :meth:`update` takes any ``(..., n)`` batch (each product is formed in float32 and accumulated in float64), so
    one pass over calibration data gives the second moment ``E[x x^T]`` and the mean ``E[x]``.
    """

    def __init__(self, n: int, device=None):
        self.n = check_positive_int("n", n)
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.total = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = 0

    @staticmethod
    @torch.no_grad()
    def batch_sums(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """``(sum x x^T, sum x, count)`` of a ``(..., n)`` batch (products in float32)."""
        x32 = x.detach().reshape(-1, x.shape[-1]).float()
        return x32.t() @ x32, x32.sum(0), x32.shape[0]

    @torch.no_grad()
    def update(self, x: torch.Tensor, sums: Optional[Tuple[torch.Tensor, torch.Tensor, int]] = None) -> None:
        """Add the inputs ``x`` (``(..., n)``); ``sums``: their :meth:`batch_sums`, when already computed."""
        if x.shape[-1] != self.n:
            raise ValueError(f"inputs have {x.shape[-1]} features, these statistics {self.n}")
        gram, total, count = self.batch_sums(x) if sums is None else sums
        if count:
            self.gram += gram.double()
            self.total += total.double()
            self.count += count

    def _check(self) -> None:
        if not self.count:
            raise ValueError("no inputs were recorded (count 0): run calibration data through the layer first")

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[x x^T]`` (``n x n``, float64)."""
        self._check()
        return self.gram / self.count

    @property
    def mean(self) -> torch.Tensor:
        """``E[x]`` (``n``, float64)."""
        self._check()
        return self.total / self.count


class HeadInputStats:
    """Per-head running sums ``sum z_h z_h^T`` (``heads x n x n``, float64) of per-head inputs ``z`` (``(..., heads,
    n)``), e.g. each head's attention-weighted average of the attention inputs ``z_h,i = sum_j a_h,ij x_j``: the
    exact statistics of the OV form (attention rows sum to one, so the value bias and output projection act on
    ``z_h``). :attr:`second_moment` is ``ov_second_moment`` for :func:`attention_activation_init`."""

    def __init__(self, heads: int, n: int, device=None):
        self.heads = check_positive_int("heads", heads)
        self.n = check_positive_int("n", n)
        self.gram = torch.zeros(heads, n, n, dtype=torch.float64, device=device)
        self.count = 0

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        if tuple(z.shape[-2:]) != (self.heads, self.n):
            raise ValueError(f"inputs have shape {tuple(z.shape)}; expected (..., {self.heads}, {self.n})")
        z = z.detach().reshape(-1, self.heads, self.n).float().transpose(0, 1)  # heads x N x n
        self.gram += (z.transpose(1, 2) @ z).double()
        self.count += z.shape[1]

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[z_h z_h^T]`` per head (``heads x n x n``, float64)."""
        if not self.count:
            raise ValueError("no inputs were recorded (count 0): run calibration data through the layer first")
        return self.gram / self.count


class TokenCounts:
    """Occurrences of each id of an embedding table (``vocab`` ids) over calibration data."""

    def __init__(self, vocab: int, device=None):
        self.vocab = check_positive_int("vocab", vocab)
        self.counts = torch.zeros(vocab, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, ids: torch.Tensor) -> None:
        ids = ids.detach().reshape(-1).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab):
            raise ValueError(f"ids must be in [0, {self.vocab}), got {int(ids.min())}..{int(ids.max())}")
        self.counts += torch.bincount(ids, minlength=self.vocab).to(self.counts)

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    @property
    def frequencies(self) -> torch.Tensor:
        """``p_i`` (sum 1, float64): the diagonal of the one-hot inputs' second moment."""
        if not self.count:
            raise ValueError("no token was recorded (count 0): run calibration data through the embedding first")
        return self.counts / self.counts.sum()


@dataclass(frozen=True)
class HeadCalibration:
    """Statistics of one self-attention layer for activation-aware per-head truncation
    (:func:`attention_activation_init`): ``second_moment`` / ``mean`` of the attention input (what q, k and v
    read), optionally ``ov_second_moment`` (``heads x d x d``: each head's attention-weighted inputs, exact for the
    OV forms), and the ``damping``."""

    second_moment: torch.Tensor
    mean: Optional[torch.Tensor] = None
    ov_second_moment: Optional[torch.Tensor] = None
    damping: float = DEFAULT_DAMPING


@dataclass(frozen=True)
class FitErrors:
    """Relative errors of one truncation (see the module docstring)."""

    rel_error: float  # of the minimized, damped objective: the tail energy of the scaled matrix
    output_rel_error: float  # on the calibration inputs (undamped second moment)
    weight_rel_error: float  # ||W - W'||_F / ||W||_F, SI's number

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# scaling
# ----------------------------------------------------------------------------------------------------------------
def _sym(C: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if not isinstance(C, torch.Tensor) or C.shape[-2:] != (n, n):
        raise ValueError(
            f"{name} must be a {n} x {n} matrix (E[x x^T] of the layer's inputs), got "
            f"{tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__}"
        )
    C = C.detach().double()
    return (C + C.transpose(-1, -2)) / 2


def _damped(C: torch.Tensor, damping: float) -> torch.Tensor:
    """``C + damping * mean(diag C) * I`` (``I`` for an all-zero ``C``), batched over leading dims."""
    damping = check_damping(damping)
    n = C.shape[-1]
    if not bool(torch.isfinite(C).all()):
        raise ValueError("the second moment must be finite")
    scale = C.diagonal(dim1=-2, dim2=-1).mean(-1)
    if bool((C.diagonal(dim1=-2, dim2=-1) < 0).any()):
        raise ValueError("the second moment must have a nonnegative diagonal (it is E[x x^T])")
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    zero = (scale == 0)[..., None, None]
    return torch.where(zero, eye, C + (damping * scale)[..., None, None] * eye)


def whitening(C: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Lower-triangular ``S`` with ``S S^T = C + damping * mean(diag C) * I`` (Cholesky, float64, batched over
    leading dims; SVD-LLM's whitening). An all-zero ``C`` gives ``S = I`` (weight-only SI). A singular damped
    matrix (``damping = 0`` on a singular ``C``) is one clear error."""
    C = _sym(C, C.shape[-1], "C")
    n = C.shape[-1]
    Cd = _damped(C, damping)
    S, info = torch.linalg.cholesky_ex(Cd)
    pivots = S.diagonal(dim1=-2, dim2=-1).pow(2)
    tiny = n * torch.finfo(torch.float64).eps * Cd.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True)
    if bool((info > 0).any()) or bool((pivots <= tiny).any()):
        raise ValueError(
            f"the second moment ({n} x {n}) is singular and damping={damping}: use damping > 0 (e.g. "
            f"{DEFAULT_DAMPING}) or more calibration data"
        )
    return S


def _times_inverse(X: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``X S^{-1}`` for lower-triangular ``S`` (a triangular solve)."""
    return torch.linalg.solve_triangular(S, X, upper=False, left=False)


def _inverse_transpose_times(S: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``S^{-T} X`` for lower-triangular ``S``."""
    return torch.linalg.solve_triangular(S.transpose(-1, -2), X, upper=True)


def _sq_norm_of_difference(A, B, A2, B2, CL=None, CR=None) -> torch.Tensor:
    """``sum_h tr(D_h^T CL_h D_h CR_h)`` for ``D_h = A_h B_h^T - A2_h B2_h^T`` (``||L^T D R||_F^2`` with
    ``L L^T = CL``, ``R R^T = CR``; ``None``: identity), through small Gram matrices, never the m x n products:
    ``D = X Y^T`` with ``X = [A, -A2]``, ``Y = [B, B2]``, and the value is ``<X^T CL X, Y^T CR Y>``."""
    return _sq_norm(torch.cat([A, -A2], dim=-1), torch.cat([B, B2], dim=-1), CL, CR)


def _sq_norm(A, B, CL=None, CR=None) -> torch.Tensor:
    """``sum_h tr(B_h A_h^T CL_h A_h B_h^T CR_h)``: the weighted squared norm of the forms ``A_h B_h^T``."""
    GA = A.transpose(-1, -2) @ (A if CL is None else CL @ A)
    GB = B.transpose(-1, -2) @ (B if CR is None else CR @ B)
    return (GA * GB).sum()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    n, d = max(float(num), 0.0), float(den)
    return (n / d) ** 0.5 if d > 0 else n**0.5


def _balanced(A: torch.Tensor, B: torch.Tensor, rank: int, pad_std, generator):
    """Balanced factors of ``A B^T`` (rank <= ``rank``): SI of the product, computed from the factors."""
    U, V = head_spectral_init(A.unsqueeze(0), B.unsqueeze(0), rank, pad_std=pad_std, generator=generator)
    return U[0], V[0]


# ----------------------------------------------------------------------------------------------------------------
# linear layers and embeddings
# ----------------------------------------------------------------------------------------------------------------
def activation_init(
    weight: torch.Tensor,
    rank: int,
    second_moment: torch.Tensor,
    *,
    damping: float = DEFAULT_DAMPING,
    pad_std: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, FitErrors]:
    """Factors ``U (m x r)``, ``V (n x r)`` of ``weight (m x n)`` minimizing ``||(W - U V^T) S||_F`` with
    ``S S^T`` the damped ``second_moment`` (``E[x x^T]`` of the layer's inputs, ``n x n``), and their errors.

    ``rel_error`` equals the tail energy of ``W S`` (see the module docstring). For ``rank >= min(m, n)`` the
    weight is kept exactly (SI's overcomplete factors, errors 0).
    """
    check_matrix("weight", weight)
    check_positive_int("rank", rank)
    m, n = weight.shape
    C = _sym(second_moment, n, "second_moment")
    W = weight.detach().double()
    if rank >= min(m, n):
        U, V = spectral_init(weight, rank, pad_std=pad_std, generator=generator)
        return U, V, FitErrors(0.0, 0.0, 0.0)
    S = whitening(C, damping)
    Uw, s, Vh = torch.linalg.svd(W @ S, full_matrices=False)  # W S = Uw diag(s) Vh
    root = s[:rank].sqrt()
    A = Uw[:, :rank] * root  # A Bs^T = [W S]_r
    B = _inverse_transpose_times(S, Vh[:rank].t() * root)  # unscaled: A B^T = [W S]_r S^{-1}
    U, V = _balanced(A, B, rank, pad_std, generator)
    rel = float(s[rank:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt()) if float(s.pow(2).sum()) > 0 else 0.0
    D = W - U @ V.t()
    out = _ratio(((D @ C) * D).sum(), ((W @ C) * W).sum())  # tr(D C D^T) / tr(W C W^T)
    wrel = _ratio(D.pow(2).sum(), W.pow(2).sum())
    return U.to(weight.dtype).contiguous(), V.to(weight.dtype).contiguous(), FitErrors(rel, out, wrel)


def embedding_activation_init(
    weight: torch.Tensor,
    rank: int,
    counts: torch.Tensor,
    *,
    damping: float = DEFAULT_DAMPING,
    pad_std: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, FitErrors]:
    """Factors ``U (vocab x r)``, ``V (d x r)`` of an embedding table ``E = weight`` minimizing
    ``sum_i w_i ||E_i - (U V^T)_i||^2`` with ``w = p + damping * mean(p)`` (``p``: token frequencies from
    ``counts``, the diagonal second moment of one-hot inputs; damped as in the module docstring).

    The result is ``E P`` with ``P`` the projector onto the top-r right singular vectors of ``diag(sqrt(w)) E``
    (computed from the ``d x d`` matrix ``E^T diag(w) E``): every row, seen or not, is projected onto the
    subspace the frequent tokens need.
    """
    check_matrix("weight", weight)
    check_positive_int("rank", rank)
    vocab, d = weight.shape
    if not isinstance(counts, torch.Tensor) or counts.shape != (vocab,):
        raise ValueError(
            f"counts must be a tensor of {vocab} token counts, got "
            f"{tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__}"
        )
    damping = check_damping(damping)
    c = counts.detach().double()
    if bool((c < 0).any()) or not bool(torch.isfinite(c).all()):
        raise ValueError("counts must be finite and >= 0")
    if rank >= min(vocab, d):
        U, V = spectral_init(weight, rank, pad_std=pad_std, generator=generator)
        return U, V, FitErrors(0.0, 0.0, 0.0)
    E = weight.detach().double()
    p = c / c.sum() if float(c.sum()) > 0 else torch.full_like(c, 1.0 / vocab)  # no counts: weight-only SI
    w = p + damping * p.mean()
    if bool((w <= 0).any()):
        raise ValueError(
            f"{int((w <= 0).sum())} tokens have weight 0 (never seen) and damping={damping}: "
            f"use damping > 0 (e.g. {DEFAULT_DAMPING})"
        )
    # right singular vectors of diag(sqrt w) E from its d x d Gram E^T diag(w) E (vocab >> d): E' = E P_r
    lam, Q = torch.linalg.eigh(E.t() @ (w.unsqueeze(1) * E))
    lam, Q = lam.flip(0).clamp_min(0), Q.flip(1)  # descending; s_i^2 = lam_i
    Vr = Q[:, :rank]
    U, V = _balanced(E @ Vr, Vr, rank, pad_std, generator)
    rel = float((lam[rank:].sum() / lam.sum()).sqrt()) if float(lam.sum()) > 0 else 0.0
    D = E - U @ V.t()
    sp = p.unsqueeze(1)
    out = _ratio((sp * D.pow(2)).sum(), (sp * E.pow(2)).sum())
    wrel = _ratio(D.pow(2).sum(), E.pow(2).sum())
    return U.to(weight.dtype).contiguous(), V.to(weight.dtype).contiguous(), FitErrors(rel, out, wrel)


# ----------------------------------------------------------------------------------------------------------------
# attention heads
# ----------------------------------------------------------------------------------------------------------------
def augmented_second_moment(second_moment: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``E[[x, 1][x, 1]^T] = [[E x x^T, E x], [E x^T, 1]]``: the second moment of a query input with the constant
    feature its bias acts on."""
    n = second_moment.shape[-1]
    if mean.shape != (n,):
        raise ValueError(f"mean must have {n} entries, got shape {tuple(mean.shape)}")
    top = torch.cat([second_moment.double(), mean.double().unsqueeze(1)], dim=1)
    bottom = torch.cat([mean.double(), mean.new_ones(1, dtype=torch.float64)]).unsqueeze(0)
    return torch.cat([top, bottom], dim=0)


def attention_activation_init(
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    o_weight: torch.Tensor,
    num_heads: int,
    second_moment: torch.Tensor,
    mean: Optional[torch.Tensor] = None,
    qk_rank: Optional[int] = None,
    ov_rank: Optional[int] = None,
    q_bias: Optional[torch.Tensor] = None,
    k_bias: Optional[torch.Tensor] = None,
    v_bias: Optional[torch.Tensor] = None,
    o_bias: Optional[torch.Tensor] = None,
    num_kv_heads: Optional[int] = None,
    *,
    ov_second_moment: Optional[torch.Tensor] = None,
    damping: float = DEFAULT_DAMPING,
) -> Tuple[Dict[str, Optional[torch.Tensor]], Dict[str, FitErrors]]:
    """Activation-aware per-head SI of a self-attention layer (``nn.Linear`` layout, the interface and bias
    handling of :func:`fnl_transformers.core.attention_spectral_init`), and the errors per form kind.

    ``second_moment`` (``d x d``) and ``mean`` (``d``) are the statistics of the attention input (what q, k and v
    read); ``mean`` is required when there is a query bias (the QK form acts on ``[x, 1]``). ``ov_second_moment``
    (``d x d``, or ``heads x d x d`` per head) replaces ``second_moment`` on the OV side, e.g. with the statistics
    of each head's attention-weighted inputs ``sum_j a_ij x_j``, for which the OV truncation is exactly optimal.
    The weights are scaled (``[W_q | b_q] S_q``, ``W_k S``, ``W_v S_ov``), truncated per head by
    ``attention_spectral_init`` and unscaled. Errors: ``{"qk": FitErrors, "ov": FitErrors}`` over all heads
    (QK errors include the query-bias column): each head is truncated on its own, so the objective and the errors
    are sums of per-head errors (``sum_h ||dW_h S_h||^2``; the cross-head terms of the summed output are not part of
    a per-head truncation). Ranks ``None`` keep the head dim (the function is unchanged).
    """
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight), ("v_weight", v_weight), ("o_weight", o_weight)):
        check_matrix(name, w)
    check_positive_int("num_heads", num_heads)
    d = q_weight.shape[1]
    H = num_heads
    C = _sym(second_moment, d, "second_moment")
    if q_bias is not None and mean is None:
        raise ValueError("a query bias acts on a constant input feature: give mean (E[x] of the attention input)")
    Cq = C if q_bias is None or mean is None else augmented_second_moment(C, mean)
    Cov = C if ov_second_moment is None else _sym(ov_second_moment, d, "ov_second_moment")
    if Cov.dim() not in (2, 3) or (Cov.dim() == 3 and Cov.shape[0] != H):
        raise ValueError(f"ov_second_moment must be d x d or {H} x d x d (one per head), got {tuple(Cov.shape)}")
    Sq, Sk = whitening(Cq, damping), whitening(C, damping)
    Sv = Sk if ov_second_moment is None else whitening(Cov, damping)

    Wq, Wk, Wv, Wo = (w.detach().double() for w in (q_weight, k_weight, v_weight, o_weight))
    if q_bias is not None:
        Wq = torch.cat([Wq, q_bias.detach().double().unsqueeze(1)], dim=1)
    q_s = Wq @ Sq
    kb, vb, ob = (None if b is None else b.detach().double() for b in (k_bias, v_bias, o_bias))
    si = attention_spectral_init(
        q_s[:, :d],
        Wk @ Sk,
        _per_head(Wv, Sv, H, torch.matmul),
        Wo,
        H,
        qk_rank=qk_rank,
        ov_rank=ov_rank,
        q_bias=None if q_bias is None else q_s[:, d],
        k_bias=kb,
        v_bias=vb,
        o_bias=ob,
        num_kv_heads=num_kv_heads,
    )
    q2, k2, v2, o2 = (_given(si, f"{k}_weight") for k in "qkvo")
    if q_bias is not None:
        q2 = torch.cat([q2, _given(si, "q_bias").unsqueeze(1)], dim=1)
    q_new = _times_inverse(q2, Sq)
    k_new = _times_inverse(k2, Sk)
    v_new = _per_head(v2, Sv, H, _times_inverse)
    out: Dict[str, Optional[torch.Tensor]] = dict(si)
    out.update(q_weight=q_new[:, :d], q_bias=None if q_bias is None else q_new[:, d], k_weight=k_new, v_weight=v_new)

    errors = {
        "qk": _qk_errors(Wq, Wk, q_new, k_new, H, (_damped(Cq, damping), _damped(C, damping)), (Cq, C)),
        "ov": _ov_errors(Wo, Wv, o2, v_new, H, _damped(Cov, damping), Cov),
    }
    dtypes = {"q": q_weight.dtype, "k": k_weight.dtype, "v": v_weight.dtype, "o": o_weight.dtype}
    cast = {k: None if t is None else t.to(dtypes[k[0]]).contiguous() for k, t in out.items()}
    return cast, errors


def _given(tensors: Dict[str, Optional[torch.Tensor]], key: str) -> torch.Tensor:
    value = tensors[key]
    if value is None:
        raise AssertionError(f"attention_spectral_init returned no {key}")
    return value


def _per_head(W: torch.Tensor, S: torch.Tensor, heads: int, op) -> torch.Tensor:
    """``op(W_h, S_h)`` for the row blocks ``W_h`` of ``W`` (``S`` shared: ``d x d``; per head: ``heads x d x d``)."""
    if S.dim() == 2:
        return op(W, S)
    rows = W.shape[0] // S.shape[0]
    return op(W.reshape(S.shape[0], rows, -1), S).reshape(W.shape[0], -1)


def _heads_ab(a_rows: torch.Tensor, b_rows: torch.Tensor, heads: int, kv_heads: int):
    """Per-head factors ``A_h = a_rows_h^T``, ``B_h = b_rows_g(h)^T`` from row-stacked projections."""
    A = a_rows.reshape(heads, a_rows.shape[0] // heads, -1).transpose(1, 2)
    B = b_rows.reshape(kv_heads, b_rows.shape[0] // kv_heads, -1).transpose(1, 2)
    return A, B.repeat_interleave(heads // kv_heads, dim=0)


def _qk_errors(Wq, Wk, Wq2, Wk2, H, damped, undamped) -> FitErrors:
    G = Wk.shape[0] * H // Wq.shape[0]
    A, B = _heads_ab(Wq, Wk, H, G)
    A2, B2 = _heads_ab(Wq2, Wk2, H, G)
    rel = _ratio(_sq_norm_of_difference(A, B, A2, B2, *damped), _sq_norm(A, B, *damped))
    out = _ratio(_sq_norm_of_difference(A, B, A2, B2, *undamped), _sq_norm(A, B, *undamped))
    return FitErrors(rel, out, _ratio(_sq_norm_of_difference(A, B, A2, B2), _sq_norm(A, B)))


def _ov_errors(Wo, Wv, Wo2, Wv2, H, damped, undamped) -> FitErrors:
    d_out = Wo.shape[0]
    A = Wo.reshape(d_out, H, -1).permute(1, 0, 2)  # W_o,h: d_out x dv
    A2 = Wo2.reshape(d_out, H, -1).permute(1, 0, 2)
    B = Wv.reshape(H, Wv.shape[0] // H, -1).transpose(1, 2)  # W_v,h^T: d x dv
    B2 = Wv2.reshape(H, Wv2.shape[0] // H, -1).transpose(1, 2)
    rel = _ratio(_sq_norm_of_difference(A, B, A2, B2, None, damped), _sq_norm(A, B, None, damped))
    out = _ratio(_sq_norm_of_difference(A, B, A2, B2, None, undamped), _sq_norm(A, B, None, undamped))
    return FitErrors(rel, out, _ratio(_sq_norm_of_difference(A, B, A2, B2), _sq_norm(A, B)))
