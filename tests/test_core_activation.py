"""Activation-aware truncation: the optimality statement of SI (Definition 3.1) in the norm of the layer's outputs.

Every check is in float64 against dense math computed independently (a different square root of the second
moment -- the eigendecomposition instead of the Cholesky factor; explicit per-head products instead of Gram
matrices): the tail energy of the scaled matrix does not depend on the square root chosen. Tolerances: 1e-9
relative for float64 identities (observed errors are about 1e-14); comparisons with weight-only SI use margins of
at least a factor 1.5 (observed factors 2.5-3 on these constructed examples).
"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fnl_transformers as fnl
from fnl_transformers.core.activation import (
    DEFAULT_DAMPING,
    InputStats,
    TokenCounts,
    activation_init,
    attention_activation_init,
    augmented_second_moment,
    embedding_activation_init,
    whitening,
)

RTOL = 1e-9


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(n_samples, n, seed=0, decay=3.0, offset=0.5):
    """Inputs concentrated near a few directions (singular values decaying over ``decay`` decades) plus an offset:
    what hidden states of a trained network look like, and where output error and weight error disagree."""
    g = _gen(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -decay, n, dtype=torch.float64)
    return torch.randn(n_samples, n, generator=g, dtype=torch.float64) @ mix.T + offset


def _stats(X):
    """Exact float64 statistics (InputStats forms its products in float32; it is tested on its own below)."""
    return SimpleNamespace(second_moment=X.T @ X / len(X), mean=X.mean(0))


def _damped(C, damping):
    return C + damping * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)


def _root(C):
    """A square root S S^T = C from the eigendecomposition (independent of the code's Cholesky factor)."""
    lam, Q = torch.linalg.eigh(C)
    return Q * lam.clamp_min(0).sqrt()


def _tail(M, rank):
    s = torch.linalg.svdvals(M)
    return float(s[rank:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())


# ----------------------------------------------------------------------------------------------------------------
# linear layers
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damping,samples", [(0.0, 400), (DEFAULT_DAMPING, 400), (DEFAULT_DAMPING, 12)])
def test_linear_error_equals_tail_energy_of_scaled_weight(damping, samples):
    """``||(W - U V^T) S||_F / ||W S||_F`` equals the tail energy of ``W S`` (``S S^T`` = damped second moment),
    also when C is singular (12 samples of 30 features; damping makes it definite)."""
    X = _correlated_inputs(samples, 30, seed=1)
    C = _stats(X).second_moment
    W = torch.randn(24, 30, generator=_gen(2), dtype=torch.float64)
    U, V, fit = activation_init(W, 7, C, damping=damping)
    assert U.shape == (24, 7) and V.shape == (30, 7) and U.dtype == torch.float64
    S = _root(_damped(C, damping))
    expected = _tail(W @ S, 7)
    direct = float(((W - U @ V.T) @ S).norm() / (W @ S).norm())
    assert fit.rel_error == pytest.approx(expected, rel=RTOL)
    assert direct == pytest.approx(expected, rel=RTOL)
    # the output error on the calibration inputs themselves (undamped), measured on the samples
    measured = float((X @ (W - U @ V.T).T).norm() / (X @ W.T).norm())
    assert fit.output_rel_error == pytest.approx(measured, rel=RTOL)
    assert fit.weight_rel_error == pytest.approx(float((W - U @ V.T).norm() / W.norm()), rel=RTOL)


def test_linear_factors_are_optimal_and_balanced():
    """No other rank-r factorization does better in the weighted norm (SI's, or small perturbations of ours),
    and the factors are balanced as SI's are (U^T U = V^T V, diagonal)."""
    X = _correlated_inputs(300, 20, seed=3)
    C = _stats(X).second_moment
    W = torch.randn(16, 20, generator=_gen(4), dtype=torch.float64)
    U, V, fit = activation_init(W, 5, C)
    S = _root(_damped(C, DEFAULT_DAMPING))
    err = lambda A, B: float(((W - A @ B.T) @ S).norm() / (W @ S).norm())  # noqa: E731
    Us, Vs = fnl.spectral_init(W, 5)
    assert err(U, V) < err(Us, Vs)
    g = _gen(5)
    for _ in range(5):
        dU, dV = torch.randn(U.shape, generator=g, dtype=U.dtype), torch.randn(V.shape, generator=g, dtype=V.dtype)
        assert err(U, V) < err(U + 1e-3 * dU, V + 1e-3 * dV)
    gu, gv = U.T @ U, V.T @ V
    assert torch.allclose(gu, gv, rtol=1e-8, atol=1e-10 * float(gu.abs().max()))
    assert torch.allclose(gu, torch.diag(gu.diagonal()), atol=1e-8 * float(gu.abs().max()))


def test_linear_beats_weight_only_si_on_outputs_of_correlated_inputs():
    """On held-out inputs from the calibration distribution, the layer's output error is less than half of SI's
    (observed: about a third)."""
    X = _correlated_inputs(2000, 30, seed=6)
    calib, held = X[:1000], X[1000:]
    W = torch.randn(40, 30, generator=_gen(7), dtype=torch.float64)
    U, V, _ = activation_init(W, 8, _stats(calib).second_moment)
    Us, Vs = fnl.spectral_init(W, 8)
    out_err = lambda A, B: float((held @ (W - A @ B.T).T).norm() / (held @ W.T).norm())  # noqa: E731
    assert out_err(U, V) < 0.5 * out_err(Us, Vs)


def test_linear_edge_cases():
    W = torch.randn(12, 10, generator=_gen(8), dtype=torch.float64)
    # an all-zero second moment (a layer the calibration never reached): weight-only SI
    U, V, fit = activation_init(W, 4, torch.zeros(10, 10, dtype=torch.float64))
    Us, Vs = fnl.spectral_init(W, 4)
    assert torch.allclose(U @ V.T, Us @ Vs.T, rtol=0, atol=1e-10)
    assert fit.rel_error == pytest.approx(fnl.tail_energy(W, 4) / float(W.norm()), rel=RTOL)
    # rank >= min(m, n): the weight is kept exactly
    U, V, fit = activation_init(W, 10, torch.eye(10, dtype=torch.float64))
    assert torch.allclose(U @ V.T, W, atol=1e-10) and fit.rel_error == 0.0
    # a singular second moment without damping: one clear error
    X = _correlated_inputs(5, 10, seed=9)
    with pytest.raises(ValueError, match="singular.*damping > 0"):
        activation_init(W, 4, _stats(X).second_moment, damping=0.0)
    with pytest.raises(ValueError, match="10 x 10 matrix"):
        activation_init(W, 4, torch.eye(12))
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        activation_init(W, 4, torch.eye(10), damping=-1)


def test_whitening_is_a_cholesky_factor_of_the_damped_moment():
    C = _stats(_correlated_inputs(50, 8, seed=10)).second_moment
    S = whitening(C, 0.05)
    assert torch.allclose(S @ S.T, _damped(C, 0.05), rtol=1e-12, atol=1e-14)
    assert torch.equal(S, torch.tril(S))


def test_input_stats_accumulate_over_batches():
    X = _correlated_inputs(90, 6, seed=11).float()
    whole, parts = InputStats(6), InputStats(6)
    whole.update(X)
    for chunk in X.split(25):
        parts.update(chunk.reshape(-1, 1, 6))  # any leading shape
    assert parts.count == 90
    assert torch.allclose(parts.second_moment, (X.double().T @ X.double()) / 90, rtol=1e-5)
    assert torch.allclose(parts.mean, X.double().mean(0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(parts.second_moment, whole.second_moment, rtol=1e-6)
    with pytest.raises(ValueError, match="count 0"):
        _ = InputStats(3).second_moment
    with pytest.raises(ValueError, match="7 features"):
        InputStats(3).update(torch.zeros(2, 7))
    counts = TokenCounts(5)
    counts.update(torch.tensor([[0, 1, 1], [4, 4, 4]]))
    assert counts.counts.tolist() == [1, 2, 0, 0, 3] and counts.count == 6
    with pytest.raises(ValueError, match=r"ids must be in \[0, 5\)"):
        counts.update(torch.tensor([5]))


def test_factorized_linear_accepts_precomputed_factors():
    X = _correlated_inputs(200, 12, seed=12).float()
    lin = nn.Linear(12, 9)
    C = _stats(X).second_moment
    layer = fnl.FactorizedLinear.from_linear(
        lin, rank=3, init=lambda W, r, generator=None: activation_init(W, r, C)[:2]
    )
    U, V, _ = activation_init(lin.weight, 3, C)
    assert torch.allclose(layer.product(), U @ V.T, atol=1e-6)
    with pytest.raises(ValueError, match=r"needs \(9, 3\) and \(12, 3\)"):
        fnl.FactorizedLinear.from_linear(lin, rank=3, init=lambda W, r, generator=None: (U[:, :2], V))


# ----------------------------------------------------------------------------------------------------------------
# embeddings
# ----------------------------------------------------------------------------------------------------------------
def test_embedding_weighted_error_equals_tail_energy_and_beats_si_on_frequent_tokens():
    """Frequent tokens near a 4-dim subspace, rare (never seen) tokens larger and spread out: SI spends its rank
    on the rare rows, the frequency-weighted truncation on the frequent ones."""
    g = _gen(13)
    seen = torch.randn(25, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 12, generator=g, dtype=torch.float64)
    E = torch.cat(
        [
            seen + 0.05 * torch.randn(25, 12, generator=g, dtype=torch.float64),
            3 * torch.randn(55, 12, generator=g, dtype=torch.float64),
        ]
    )
    counts = torch.zeros(80, dtype=torch.float64)
    counts[:25] = torch.rand(25, generator=g, dtype=torch.float64) * 100 + 1  # 55 tokens never seen
    U, V, fit = embedding_activation_init(E, 4, counts)
    p = counts / counts.sum()
    w = p + DEFAULT_DAMPING * p.mean()
    scaled = w.sqrt().unsqueeze(1) * E
    assert fit.rel_error == pytest.approx(_tail(scaled, 4), rel=RTOL)
    D = E - U @ V.T
    assert float((w.unsqueeze(1) * D.pow(2)).sum().sqrt() / scaled.norm()) == pytest.approx(_tail(scaled, 4), rel=RTOL)
    # every row, seen or not, is projected onto the top-4 right singular subspace of the scaled table
    Vh = torch.linalg.svd(scaled, full_matrices=False).Vh[:4]
    assert torch.allclose(U @ V.T, E @ Vh.T @ Vh, atol=1e-10)
    Us, Vs = fnl.spectral_init(E, 4)
    seen_err = lambda A, B: float((p.unsqueeze(1) * (E - A @ B.T).pow(2)).sum().sqrt())  # noqa: E731
    assert seen_err(U, V) < seen_err(Us, Vs) / 1.5
    assert fit.output_rel_error == pytest.approx(
        seen_err(U, V) / float((p.unsqueeze(1) * E.pow(2)).sum().sqrt()), rel=RTOL
    )
    with pytest.raises(ValueError, match="never seen.*damping > 0"):
        embedding_activation_init(E, 4, counts, damping=0.0)
    with pytest.raises(ValueError, match="80 token counts"):
        embedding_activation_init(E, 4, counts[:10])


# ----------------------------------------------------------------------------------------------------------------
# attention heads (paper Sec. 2.3, Eq. (1))
# ----------------------------------------------------------------------------------------------------------------
H, DK, D = 4, 6, 16


def _attention(seed=14):
    g = _gen(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    w = {"q_weight": r(H * DK, D), "k_weight": r(H * DK, D), "v_weight": r(H * DK, D), "o_weight": r(D, H * DK)}
    b = {"q_bias": r(H * DK), "k_bias": r(H * DK), "v_bias": r(H * DK), "o_bias": r(D)}
    return w, b


def _qk_heads(q, qb, k):
    """Per-head QK forms [W_q,h | b_q,h]^T W_k,h ((D + 1) x D), explicitly."""
    A = torch.cat([q.reshape(H, -1, D), qb.reshape(H, -1, 1)], dim=2)
    return A.transpose(1, 2) @ k.reshape(H, -1, D)


def _ov_heads(o, v):
    return o.reshape(D, H, -1).permute(1, 0, 2) @ v.reshape(H, -1, D)


def test_attention_errors_equal_per_head_tail_energies():
    w, b = _attention()
    X = _correlated_inputs(500, D, seed=15)
    st = _stats(X)
    out, errors = attention_activation_init(*w.values(), H, st.second_moment, st.mean, qk_rank=2, ov_rank=3, **b)
    Cq, C = augmented_second_moment(st.second_moment, st.mean), st.second_moment
    Sq, Sk = _root(_damped(Cq, DEFAULT_DAMPING)), _root(_damped(C, DEFAULT_DAMPING))

    def expected(forms, L, R, rank):
        scaled = [L.T @ f @ R for f in forms]
        tails = sum(float(torch.linalg.svdvals(f)[rank:].pow(2).sum()) for f in scaled)
        return (tails / sum(float(f.pow(2).sum()) for f in scaled)) ** 0.5

    qk, qk2 = (
        _qk_heads(w["q_weight"], b["q_bias"], w["k_weight"]),
        _qk_heads(out["q_weight"], out["q_bias"], out["k_weight"]),
    )
    assert errors["qk"].rel_error == pytest.approx(expected(qk, Sq, Sk, 2), rel=RTOL)
    direct = sum(float((Sq.T @ (a - a2) @ Sk).pow(2).sum()) for a, a2 in zip(qk, qk2))
    assert (direct / sum(float((Sq.T @ a @ Sk).pow(2).sum()) for a in qk)) ** 0.5 == pytest.approx(
        expected(qk, Sq, Sk, 2), rel=RTOL
    )
    ov, ov2 = _ov_heads(w["o_weight"], w["v_weight"]), _ov_heads(out["o_weight"], out["v_weight"])
    eye = torch.eye(D, dtype=torch.float64)
    assert errors["ov"].rel_error == pytest.approx(expected(ov, eye, Sk, 3), rel=RTOL)
    direct = sum(float(((a - a2) @ Sk).pow(2).sum()) for a, a2 in zip(ov, ov2))
    assert (direct / sum(float((a @ Sk).pow(2).sum()) for a in ov)) ** 0.5 == pytest.approx(
        expected(ov, eye, Sk, 3), rel=RTOL
    )
    assert out["q_weight"].shape == (H * 2, D) and out["v_weight"].shape == (H * 3, D)
    assert torch.equal(out["k_bias"], torch.zeros(H * 2, dtype=torch.float64))
    assert torch.allclose(out["o_bias"], b["o_bias"] + w["o_weight"] @ b["v_bias"], rtol=1e-12)


def _scores(q, qb, k, kb, X):
    Q = (X @ q.T + qb).reshape(len(X), H, -1)
    K = (X @ k.T + kb).reshape(len(X), H, -1)
    s = torch.einsum("ihd,jhd->hij", Q, K)
    return s - s.mean(-1, keepdim=True)  # a per-query constant does not change the softmax


def test_attention_at_full_head_dim_keeps_the_function():
    w, b = _attention(16)
    st = _stats(_correlated_inputs(300, D, seed=17))
    out, errors = attention_activation_init(*w.values(), H, st.second_moment, st.mean, **b)
    X = _correlated_inputs(20, D, seed=18)
    ref = _scores(w["q_weight"], b["q_bias"], w["k_weight"], b["k_bias"], X)
    got = _scores(out["q_weight"], out["q_bias"], out["k_weight"], out["k_bias"], X)
    assert float((got - ref).norm() / ref.norm()) < 1e-10
    ref_ov = (
        torch.stack([X @ f.T for f in _ov_heads(w["o_weight"], w["v_weight"])]).sum(0)
        + w["o_weight"] @ b["v_bias"]
        + b["o_bias"]
    )
    got_ov = torch.stack([X @ f.T for f in _ov_heads(out["o_weight"], out["v_weight"])]).sum(0) + out["o_bias"]
    assert float((got_ov - ref_ov).norm() / ref_ov.norm()) < 1e-10
    assert errors["qk"].rel_error < 1e-7 and errors["ov"].rel_error < 1e-7


def test_attention_beats_weight_only_si_on_scores_and_outputs():
    """Held-out inputs from the calibration distribution: attention-score and OV-output errors less than 1/1.5 of
    per-head SI's (core attention_spectral_init)."""
    w, b = _attention(19)
    X = _correlated_inputs(1200, D, seed=20)
    calib, held = X[:800], X[800:]
    st = _stats(calib)
    act, _ = attention_activation_init(*w.values(), H, st.second_moment, st.mean, qk_rank=2, ov_rank=2, **b)
    si = fnl.attention_spectral_init(*w.values(), H, qk_rank=2, ov_rank=2, **b)
    ref = _scores(w["q_weight"], b["q_bias"], w["k_weight"], b["k_bias"], held)

    def score_err(t):
        return float((_scores(t["q_weight"], t["q_bias"], t["k_weight"], t["k_bias"], held) - ref).norm() / ref.norm())

    assert score_err(act) < score_err(si) / 1.5
    ov_ref = torch.stack([held @ f.T for f in _ov_heads(w["o_weight"], w["v_weight"])]).sum(0)

    def ov_err(t):
        out = torch.stack([held @ f.T for f in _ov_heads(t["o_weight"], t["v_weight"])]).sum(0)
        return float((out - ov_ref).norm() / ov_ref.norm())

    assert ov_err(act) < ov_err(si) / 1.5


def test_attention_per_head_ov_statistics():
    """Per-head OV statistics (heads x d x d) equal to the shared one give the same result; different ones are
    used per head (each head's OV error is its own tail energy)."""
    w, b = _attention(21)
    st = _stats(_correlated_inputs(300, D, seed=22))
    C = st.second_moment
    shared, _ = attention_activation_init(*w.values(), H, C, st.mean, ov_rank=2, **b)
    same, _ = attention_activation_init(*w.values(), H, C, st.mean, ov_rank=2, ov_second_moment=C.expand(H, D, D), **b)
    assert torch.allclose(
        _ov_heads(same["o_weight"], same["v_weight"]), _ov_heads(shared["o_weight"], shared["v_weight"]), atol=1e-9
    )
    per_head = torch.stack([_stats(_correlated_inputs(300, D, seed=30 + h)).second_moment for h in range(H)])
    out, errors = attention_activation_init(*w.values(), H, C, st.mean, ov_rank=2, ov_second_moment=per_head, **b)
    ov, ov2 = _ov_heads(w["o_weight"], w["v_weight"]), _ov_heads(out["o_weight"], out["v_weight"])
    S = [_root(_damped(c, DEFAULT_DAMPING)) for c in per_head]
    tails = sum(float(torch.linalg.svdvals(f @ s)[2:].pow(2).sum()) for f, s in zip(ov, S))
    norms = sum(float((f @ s).pow(2).sum()) for f, s in zip(ov, S))
    assert errors["ov"].rel_error == pytest.approx((tails / norms) ** 0.5, rel=RTOL)
    direct = sum(float(((f - f2) @ s).pow(2).sum()) for f, f2, s in zip(ov, ov2, S))
    assert (direct / norms) ** 0.5 == pytest.approx((tails / norms) ** 0.5, rel=RTOL)
    with pytest.raises(ValueError, match="one per head"):
        attention_activation_init(*w.values(), H, C, st.mean, ov_second_moment=per_head[:2], **b)
    with pytest.raises(ValueError, match="give mean"):
        attention_activation_init(*w.values(), H, C, None, **b)


def test_shrink_heads_activation_init_is_attention_activation_init_form_by_form():
    """core.heads.shrink_heads with "activation": the tensors and errors of attention_activation_init for the forms
    chosen; the other form spectral (attention_spectral_init's tensors), random or kept."""
    from fnl_transformers.core import HeadDims, shrink_heads, shrink_heads_with_errors
    from fnl_transformers.core.activation import HeadCalibration

    w, b = _attention(23)
    t = {**w, **b}
    st = _stats(_correlated_inputs(300, D, seed=24))
    cal = HeadCalibration(st.second_moment, st.mean, damping=0.05)
    dims = HeadDims(H, H, DK, 2, 3)
    ref, ref_errors = attention_activation_init(
        *w.values(), H, st.second_moment, st.mean, qk_rank=2, ov_rank=3, damping=0.05, **b
    )
    both, errors = shrink_heads_with_errors(t, dims, "activation", "activation", calibration=cal)
    assert all(torch.equal(both[k], ref[k]) for k in ref if ref[k] is not None) and errors == ref_errors
    si = fnl.attention_spectral_init(*w.values(), H, qk_rank=2, ov_rank=3, **b)
    mixed, errors = shrink_heads_with_errors(t, dims, "activation", "spectral", calibration=cal)
    assert set(errors) == {"qk"}
    assert all(torch.equal(mixed[k], ref[k]) for k in ("q_weight", "q_bias", "k_weight", "k_bias"))
    assert all(torch.equal(mixed[k], si[k]) for k in ("v_weight", "v_bias", "o_weight", "o_bias"))
    fresh = lambda key, shape, like: torch.zeros(shape, dtype=like.dtype)  # noqa: E731
    kept = shrink_heads(t, HeadDims(H, H, DK, 2, DK), "activation", None, fresh, calibration=cal)
    assert kept["v_weight"] is t["v_weight"] and kept["o_bias"] is t["o_bias"]  # OV kept as it is
    assert torch.equal(
        kept["q_weight"],
        attention_activation_init(*w.values(), H, st.second_moment, st.mean, qk_rank=2, damping=0.05, **b)[0][
            "q_weight"
        ],
    )
    with pytest.raises(ValueError, match="needs the attention input's statistics"):
        shrink_heads(t, dims, "activation", "random", fresh)
