"""Spectral initialization: Eckart-Young optimality, edge cases, per-head SI without d x d products."""

import math

import pytest
import torch

import fnl_transformers as fnl
from fnl_transformers.core.spectral import head_spectral_init

RTOL = 1e-5


def _rank_deficient(m, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)


@pytest.mark.parametrize(
    "name,weight,rank",
    [
        ("random", torch.randn(40, 24, generator=torch.Generator().manual_seed(1)), 7),
        ("random_wide", torch.randn(12, 50, generator=torch.Generator().manual_seed(2)), 12),
        ("rank_deficient_truncated", _rank_deficient(30, 20, 6), 4),
        ("rank_deficient_exceeding", _rank_deficient(30, 20, 6), 10),
        ("all_zero", torch.zeros(16, 9), 5),
    ],
)
def test_si_reconstruction_error_equals_tail_energy(name, weight, rank):
    U, V = fnl.spectral_init(weight, rank)
    assert U.shape == (weight.shape[0], rank) and V.shape == (weight.shape[1], rank)
    err = float((weight.double() - U.double() @ V.double().T).norm())
    tail = fnl.tail_energy(weight, rank)
    scale = float(weight.double().norm())
    # 1e-5 relative to the tail energy, or to ||W|| when the tail is (numerically) zero
    assert abs(err - tail) <= RTOL * max(tail, scale, 1e-30) + 1e-12, (name, err, tail)


def test_si_factors_are_balanced_u_r_sqrt_s():
    W = torch.randn(20, 15, generator=torch.Generator().manual_seed(3))
    U, V = fnl.spectral_init(W, 6)
    Us, s, Vh = torch.linalg.svd(W, full_matrices=False)
    # U^T U = V^T V = S_r (U = U_r sqrt(S_r), V = V_r sqrt(S_r)). A float32 SVD's singular vectors are orthonormal
    # to ~n eps, so the error scales with the largest singular value: measured 1.2e-6 s_1; 1e-4 s_1 leaves 80x
    # (unbalanced factors, e.g. U = U_r S_r, would be off by ~s_1^2)
    tol = 1e-4 * float(s[0])
    torch.testing.assert_close(U.T @ U, torch.diag(s[:6]), rtol=0, atol=tol)
    torch.testing.assert_close(V.T @ V, torch.diag(s[:6]), rtol=0, atol=tol)


@pytest.mark.parametrize("weight", [torch.zeros(8, 6), _rank_deficient(8, 6, 2)])
def test_si_dead_pairs_are_revived_and_receive_gradient(weight):
    U, V = fnl.spectral_init(weight, 5)  # rank 5 > numerical rank
    U.requires_grad_(True)
    V.requires_grad_(True)
    G = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    ((U @ V.T) * G).sum().backward()
    # every column pair gets a gradient: no pair is stuck at (0, 0)
    assert bool((U.grad.norm(dim=0) + V.grad.norm(dim=0) > 0).all())


def test_si_overcomplete_is_exact_and_pads_with_live_columns():
    W = torch.randn(10, 6, generator=torch.Generator().manual_seed(4))
    U, V = fnl.spectral_init(W, 9)
    torch.testing.assert_close(U @ V.T, W, rtol=1e-5, atol=1e-5)
    assert float(U[:, 6:].abs().max()) == 0.0 and float(V[:, 6:].norm()) > 0


def test_si_tiny_norm_matrix_is_scale_invariant():
    W = torch.randn(12, 8, generator=torch.Generator().manual_seed(5)) * 1e-20
    U, V = fnl.spectral_init(W, 3)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    err = float((W.double() - U.double() @ V.double().T).norm())
    assert abs(err - fnl.tail_energy(W, 3)) <= 1e-4 * float(W.double().norm())


def test_si_keeps_half_precision_dtype():
    W = torch.randn(16, 8).to(torch.bfloat16)
    U, V = fnl.spectral_init(W, 4)
    assert U.dtype == V.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight=torch.randn(4, 4), rank=0), "rank must be a positive integer"),
        (dict(weight=torch.randn(4, 4), rank=-2), "rank must be a positive integer"),
        (dict(weight=torch.randn(4, 4), rank=2.5), "rank must be a positive integer"),
        (dict(weight=torch.randn(4), rank=1), "2-D"),
        (dict(weight=torch.randn(2, 3, 4), rank=1), "2-D"),
    ],
)
def test_si_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fnl.spectral_init(**kwargs)


def _dense_truncation(A, B, r):
    """Best rank-r approximation of each dense head form A_h B_h^T (the reference, via a d x d SVD)."""
    out = []
    for a, b in zip(A.double(), B.double()):
        u, s, vh = torch.linalg.svd(a @ b.T)
        out.append(u[:, :r] @ torch.diag(s[:r]) @ vh[:r])
    return torch.stack(out)


def test_head_si_equals_truncated_svd_of_each_dense_form(monkeypatch):
    g = torch.Generator().manual_seed(6)
    H, d, k, r = 4, 32, 8, 3
    A, B = torch.randn(H, d, k, generator=g), torch.randn(H, d + 1, k, generator=g)
    shapes = []
    real_svd = torch.linalg.svd

    def spy(x, *a, **kw):
        shapes.append(tuple(x.shape[-2:]))
        return real_svd(x, *a, **kw)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    A2, B2 = head_spectral_init(A, B, r)
    monkeypatch.setattr(torch.linalg, "svd", real_svd)
    assert shapes and all(max(s) <= k for s in shapes), f"SVD on a large matrix: {shapes}"
    # float32 factors vs a float64 reference: the error scales with the largest entry of the forms (measured
    # 1.3e-5 with entries up to 11, i.e. 1.2e-6 of it); 1e-4 of the largest entry leaves a margin of 80x,
    # while a wrong truncation is off by a singular value (O(1))
    ref = _dense_truncation(A, B, r)
    torch.testing.assert_close((A2 @ B2.transpose(1, 2)).double(), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize(
    "rank,match", [(0, "positive integer"), (9, r"head dim \(rank\) 9 does not fit .*dimension 8 and can only shrink")]
)
def test_head_si_bad_rank(rank, match):
    with pytest.raises(ValueError, match=match):
        head_spectral_init(torch.randn(2, 16, 8), torch.randn(2, 16, 8), rank)


def test_rank_rule_and_bad_rank_scale():
    assert fnl.rank_from_scale(512, 2048, 0.25) == 128
    assert fnl.rank_from_scale(10, 3, 0.01) == 1  # max(1, round(...))
    assert fnl.rank_from_scale(10, 6, 1.5) == 9  # overcomplete
    for bad in (0, -0.5, float("nan"), float("inf"), "x", None):
        with pytest.raises(ValueError, match="rank_scale must be"):
            fnl.rank_from_scale(10, 10, bad)
    with pytest.raises(ValueError, match="either rank or rank_scale"):
        fnl.resolve_rank(4, 4, rank=2, rank_scale=0.5)


def test_rank_scale_for_param_ratio_meets_target():
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    total = sum(p.numel() for p in model.parameters())
    scale = fnl.rank_scale_for_param_ratio(model, 0.5)
    count = lambda s: sum(  # noqa: E731
        fnl.factorized_param_count(m, n, fnl.rank_from_scale(m, n, s), bias=True) for m, n in [(256, 64), (64, 256)]
    )
    assert count(scale) <= 0.5 * total < count(scale * 1.05)  # largest scale under the target (step function)
    with pytest.raises(ValueError, match="below the smallest reachable ratio"):
        fnl.rank_scale_for_param_ratio(model, 1e-4)
    assert math.isfinite(scale)
