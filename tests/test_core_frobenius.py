"""Frobenius decay: penalty and gradients equal autograd through the dense product (1e-5 relative)."""

import pytest
import torch
from torch import nn

import fnl_transformers as fnl
from fnl_transformers.core.frobenius import form_grads, form_sq_norms, use_product

RTOL = 1e-5


def _close(a, b, rtol=RTOL):
    a, b = a.detach().double(), b.detach().double()
    assert float((a - b).norm()) <= rtol * max(float(b.norm()), 1e-30), (float((a - b).norm()), float(b.norm()))


def _grads(module, loss):
    module.zero_grad()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _check_against_dense(module, dense_sq_norm, **coeffs):
    """penalty(model) == sum lambda/2 ||W||^2 computed densely, and its autograd gradient; also fd_grads."""
    pen = fnl.frobenius_penalty(module, **coeffs)
    got = _grads(module, pen)
    ref_value = dense_sq_norm()
    want = _grads(module, ref_value)
    _close(pen.detach(), ref_value.detach())
    assert set(got) == set(want)
    for name in want:
        _close(got[name], want[name])
    closed = fnl.fd_grads(module, **coeffs)  # closed-form gradients used by decoupled FD
    assert set(closed) == set(want)
    for name in want:
        _close(closed[name], want[name])


@pytest.mark.parametrize("rank", [3, 40])  # low rank (Gram route) and overcomplete (product route)
@pytest.mark.parametrize("deep", [False, True])
def test_fd_linear_matches_dense_autograd(rank, deep):
    torch.manual_seed(0)
    layer = fnl.FactorizedLinear.from_linear(nn.Linear(24, 16), rank=rank, deep=deep)
    if deep:
        with torch.no_grad():
            layer.M.add_(0.3 * torch.randn_like(layer.M))
    assert use_product(16, 24, rank) == (rank == 40)
    dense = lambda: 0.7 / 2 * (layer._left() @ layer.V.T).pow(2).sum()  # noqa: E731  lambda/2 ||U M V^T||^2
    _check_against_dense(layer, dense, linear=0.7)


def test_fd_embedding_matches_dense_autograd():
    torch.manual_seed(1)
    emb = fnl.FactorizedEmbedding.from_embedding(nn.Embedding(50, 12, padding_idx=1), rank=5)
    _check_against_dense(emb, lambda: 0.2 / 2 * (emb.U @ emb.V.T).pow(2).sum(), embedding=0.2)


def test_fd_kinds_are_separate():
    torch.manual_seed(2)
    model = nn.Sequential(
        fnl.FactorizedLinear.from_linear(nn.Linear(8, 8), rank=2),
        fnl.FactorizedEmbedding.from_embedding(nn.Embedding(10, 8), rank=2),
    )
    parts = fnl.frobenius_penalty_by_kind(model, linear=1.0, embedding=3.0)
    _close(parts["linear"].detach(), 0.5 * model[0].product().pow(2).sum())
    _close(parts["embedding"].detach(), 1.5 * model[1].product().pow(2).sum())
    assert set(fnl.frobenius_penalty_by_kind(model, linear=1.0)) == {"linear"}
    assert float(fnl.frobenius_penalty(model)) == 0.0  # nothing asked for


def test_fd_on_a_model_without_forms_of_the_kinds_asked_is_one_clear_error():
    dense = nn.Sequential(nn.Linear(8, 8), nn.Embedding(10, 8))
    with pytest.raises(ValueError, match=r"fd_linear > 0 but the model has no linear forms to decay \(it has \[\]\)"):
        fnl.frobenius_penalty(dense, linear=1.0)
    emb = nn.Sequential(fnl.FactorizedEmbedding.from_embedding(nn.Embedding(10, 8), rank=2))
    with pytest.raises(ValueError, match=r"fd_qk, fd_ov > 0 but the model has no ov/qk forms .*\['embedding'\]"):
        fnl.frobenius_penalty_by_kind(emb, qk=0.1, ov=0.1)
    assert set(fnl.frobenius_penalty_by_kind(emb, embedding=0.1, qk=0.1)) == {"embedding"}  # one kind present


class TinyAttention(nn.Module):
    """Dense multi-head attention with biases, nn.Linear layout, forms registered like an integration does."""

    def __init__(self, d=16, heads=4, kv_heads=None, head_dim=None):
        super().__init__()
        kv_heads = kv_heads or heads
        hd = head_dim or d // heads
        self.q = nn.Linear(d, heads * hd)
        self.k = nn.Linear(d, kv_heads * hd)
        self.v = nn.Linear(d, kv_heads * hd)
        self.o = nn.Linear(heads * hd, d)
        self.heads, self.kv_heads, self.hd = heads, kv_heads, hd
        fnl.register_attention_forms(
            self, fnl.attention_form_specs("q.weight", "k.weight", "v.weight", "o.weight", heads, kv_heads)
        )

    def dense_forms(self):
        """Per head W_q,h^T W_k,h (QK) and W_o,h W_v,h (OV), formed densely (the reference)."""
        g = self.heads // self.kv_heads
        Wq = self.q.weight.view(self.heads, self.hd, -1)
        Wk = self.k.weight.view(self.kv_heads, self.hd, -1).repeat_interleave(g, 0)
        Wv = self.v.weight.view(self.kv_heads, self.hd, -1).repeat_interleave(g, 0)
        Wo = self.o.weight.view(-1, self.heads, self.hd).permute(1, 0, 2)
        return Wq.transpose(1, 2) @ Wk, Wo @ Wv


@pytest.mark.parametrize("kv_heads", [None, 2])  # multi-head and grouped-query attention
def test_fd_attention_forms_with_biases_match_dense_autograd(kv_heads):
    torch.manual_seed(3)
    att = TinyAttention(kv_heads=kv_heads)

    def dense():
        qk, ov = att.dense_forms()
        return 0.3 / 2 * qk.pow(2).sum() + 0.05 / 2 * ov.pow(2).sum()

    _check_against_dense(att, dense, qk=0.3, ov=0.05)
    pen = fnl.frobenius_penalty(att, qk=0.3, ov=0.05)
    grads = _grads(att, pen)
    assert all(not n.endswith("bias") for n in grads)  # biases are outside the forms: no FD


def test_attention_forms_are_views_not_copies():
    d, H = 16, 4
    q, k, v, o = (torch.randn(d, d) for _ in range(4))
    forms = fnl.attention_forms(q, k, v, o, H)
    for t, src in ((forms["qk"].A, q), (forms["qk"].B, k), (forms["ov"].A, o), (forms["ov"].B, v)):
        assert t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()
    # A_h B_h^T is W_q,h^T W_k,h and W_o,h W_v,h
    torch.testing.assert_close(forms["qk"].A[1] @ forms["qk"].B[1].T, q[4:8].T @ k[4:8])
    torch.testing.assert_close(forms["ov"].A[2] @ forms["ov"].B[2].T, o[:, 8:12] @ v[8:12])
    with pytest.raises(ValueError, match="do not divide into 3 heads"):
        fnl.attention_forms(q, k, v, o, 3)


def test_fused_transposed_layout_matches_split_layout():
    """GPT-2 style: one Conv1D-layout c_attn (d x 3d) and c_proj (d x d), read through row slices."""
    torch.manual_seed(4)
    d, H = 12, 3
    c_attn, c_proj = torch.randn(d, 3 * d), torch.randn(d, d)
    specs = fnl.attention_form_specs(
        "c_attn",
        "c_attn",
        "c_attn",
        "c_proj",
        H,
        transposed=True,
        q_slice=(0, d),
        k_slice=(d, 2 * d),
        v_slice=(2 * d, 3 * d),
    )
    params = {"c_attn": c_attn, "c_proj": c_proj}
    fused = {s.kind: s.bind(params.__getitem__) for s in specs}
    split = fnl.attention_forms(c_attn[:, :d].T, c_attn[:, d : 2 * d].T, c_attn[:, 2 * d :].T, c_proj.T, H)
    for kind in ("qk", "ov"):
        torch.testing.assert_close(form_sq_norms(fused[kind]), form_sq_norms(split[kind]))


def test_fd_in_half_precision_does_not_overflow():
    torch.manual_seed(5)
    U = (torch.randn(64, 8) * 60).half()  # product entries ~ 60*60*8: ||W||^2 far beyond fp16's 65504
    V = (torch.randn(48, 8) * 60).half()
    layer = fnl.FactorizedLinear(48, 64, 8).half()
    with torch.no_grad():
        layer.U.copy_(U)
        layer.V.copy_(V)
    pen = fnl.frobenius_penalty(layer, linear=1.0)
    assert pen.dtype == torch.float32 and torch.isfinite(pen)
    _close(pen.detach(), 0.5 * (U.double() @ V.double().T).pow(2).sum(), rtol=1e-3)
    for dtype in (torch.bfloat16, torch.float16):
        dA, dB, _ = form_grads(next(iter(fnl.iter_forms(layer.to(dtype))))[3])
        assert torch.isfinite(dA).all() and torch.isfinite(dB).all()


def test_diagnostics_match_dense_norms():
    torch.manual_seed(6)
    layer = fnl.FactorizedLinear.from_linear(nn.Linear(20, 10), rank=4, init="random")
    W = layer.product().double()
    diag = fnl.form_diagnostics(layer, lr=0.1)
    assert diag["linear/frobenius"] == pytest.approx(float(W.norm()), rel=1e-5)
    assert diag["linear/nuclear"] == pytest.approx(float(torch.linalg.svdvals(W).sum()), rel=1e-5)
    bound = (layer.U.double().pow(2).sum() + layer.V.double().pow(2).sum()) / 2
    assert diag["linear/wd_bound"] == pytest.approx(float(bound), rel=1e-5)
    assert diag["linear/nuclear"] <= diag["linear/wd_bound"] * (1 + 1e-6)  # ||W||_* <= (||U||^2 + ||V||^2) / 2
    assert diag["linear/eff_step"] == pytest.approx(0.1 / float(W.norm() ** 2), rel=1e-5)


def test_bad_fd_coefficients():
    layer = fnl.FactorizedLinear(4, 4, 2)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="FD coefficient for 'qk' must be a finite number >= 0"):
            fnl.frobenius_penalty(layer, qk=bad)


def test_check_finite_names_the_layer():
    model = nn.Sequential(nn.Linear(3, 3), fnl.FactorizedLinear(3, 3, 2))
    fnl.check_finite(model, loss=torch.tensor(1.0))
    with pytest.raises(fnl.NonFiniteError, match="loss is nan"):
        fnl.check_finite(model, loss=torch.tensor(float("nan")))
    with torch.no_grad():
        model[1].V[0, 0] = float("inf")
    with pytest.raises(fnl.NonFiniteError, match=r"parameter '1.V' \(layer '1'\) contains Inf"):
        fnl.check_finite(model)
