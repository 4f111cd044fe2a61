"""Factorized layers and per-head attention SI: equivalences with the dense layers they replace."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fnl_transformers as fnl


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any op produces (to prove a product is never formed)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def test_full_rank_si_reproduces_linear():
    torch.manual_seed(0)
    lin = nn.Linear(24, 16)
    fl = fnl.FactorizedLinear.from_linear(lin, rank_scale=1.0)
    assert fl.rank == 16
    x = torch.randn(5, 7, 24)
    # SI goes through a float32 SVD: its reconstruction error (measured 1.9e-6 on outputs of size ~1) depends on
    # the LAPACK/BLAS blocking; 1e-4 leaves a margin of 50x, and a wrong factorization is off by O(1)
    torch.testing.assert_close(fl(x), lin(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("deep", [False, True])
def test_to_linear_round_trip_is_exact(deep):
    torch.manual_seed(1)
    fl = fnl.FactorizedLinear.from_linear(nn.Linear(12, 9), rank=4, init="random", deep=deep)
    lin = fl.to_linear()
    assert type(lin) is nn.Linear
    torch.testing.assert_close(lin.weight, fl.product(), rtol=0, atol=0)  # bitwise: to_linear copies product()
    x = torch.randn(3, 12)
    # x W^T vs (x V) U^T: two float32 code paths, measured 9e-8 (~1 ulp) on outputs < 1; 1e-5 leaves 100x
    torch.testing.assert_close(lin(x), fl(x), rtol=1e-5, atol=1e-5)


def test_low_rank_forward_never_forms_the_product():
    fl = fnl.FactorizedLinear(96, 80, rank=8)
    assert fl.factored_is_cheaper
    with ShapeRecorder() as rec:
        fl(torch.randn(4, 96))
    assert (80, 96) not in rec.shapes and (96, 80) not in rec.shapes


def test_overcomplete_forward_uses_the_product_and_matches():
    torch.manual_seed(2)
    fl = fnl.FactorizedLinear.from_linear(nn.Linear(16, 12), rank=24, deep=True)  # overcomplete
    assert not fl.factored_is_cheaper
    x = torch.randn(6, 16)
    with ShapeRecorder() as rec:
        y = fl(x)
    assert (12, 16) in rec.shapes
    torch.testing.assert_close(y, ((x @ fl.V) @ fl.M.T) @ fl.U.T + fl.bias, rtol=1e-5, atol=1e-5)


def test_embedding_full_rank_and_round_trip_with_padding():
    torch.manual_seed(3)
    emb = nn.Embedding(30, 8, padding_idx=2)
    fe = fnl.FactorizedEmbedding.from_embedding(emb, rank_scale=1.0)
    ids = torch.tensor([[0, 2, 5], [2, 29, 7]])
    torch.testing.assert_close(fe(ids), emb(ids), rtol=1e-5, atol=1e-5)
    back = fe.to_embedding()
    assert back.padding_idx == 2
    torch.testing.assert_close(back.weight, fe.product(), rtol=0, atol=0)  # bitwise: to_embedding copies product()
    torch.testing.assert_close(fe.project(torch.ones(1, 8)), torch.ones(1, 8) @ fe.product().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deep", [False, True])
def test_embedding_padding_row_is_zero_and_gets_no_gradient(deep):
    torch.manual_seed(4)
    fe = fnl.FactorizedEmbedding(20, 6, rank=3, padding_idx=0, deep=deep)
    ids = torch.tensor([0, 0, 3, 4])
    out = fe(ids)
    assert float(out[:2].detach().abs().max()) == 0.0
    (out * torch.randn_like(out)).sum().backward()
    assert float(fe.U.grad[0].abs().max()) == 0.0
    assert float(fe.product()[0].abs().max()) == 0.0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: fnl.FactorizedLinear.from_linear(nn.Linear(4, 4), rank=0), "rank must be a positive integer"),
        (lambda: fnl.FactorizedLinear.from_linear(nn.Linear(4, 4), rank_scale=0.0), "rank_scale must be"),
        (lambda: fnl.FactorizedLinear.from_linear(nn.Linear(4, 4), rank_scale=float("nan")), "rank_scale must be"),
        (lambda: fnl.FactorizedLinear.from_linear(nn.Linear(4, 4)), "give rank"),
        (lambda: fnl.FactorizedLinear.from_linear(nn.Linear(4, 4), rank=2, init="svd"), "init must be one of"),
        (lambda: fnl.FactorizedEmbedding(5, 3, 2, padding_idx=7), "padding_idx must be in"),
    ],
)
def test_layer_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _attention(x, w, H, scaling):
    """Reference multi-head self-attention (nn.Linear layout, biases, softmax over keys)."""
    T, d = x.shape
    q = F.linear(x, w["q_weight"], w["q_bias"]).view(T, H, -1).transpose(0, 1)
    k = F.linear(x, w["k_weight"], w["k_bias"]).view(T, H, -1).transpose(0, 1)
    v = F.linear(x, w["v_weight"], w["v_bias"]).view(T, H, -1).transpose(0, 1)
    p = torch.softmax(q @ k.transpose(1, 2) * scaling, dim=-1)
    return F.linear((p @ v).transpose(0, 1).reshape(T, -1), w["o_weight"], w["o_bias"])


def _random_attention(d, H, seed):
    g = torch.Generator().manual_seed(seed)
    w = {f"{n}_weight": torch.randn(d, d, generator=g) / math.sqrt(d) for n in "qkvo"}
    w.update({f"{n}_bias": torch.randn(d, generator=g) for n in "qkvo"})
    return w


def test_attention_si_full_rank_with_biases_is_exact():
    d, H = 16, 4
    w = _random_attention(d, H, 0)
    x = torch.randn(7, d, generator=torch.Generator().manual_seed(1))
    new = fnl.attention_spectral_init(num_heads=H, **w)
    assert float(new["k_bias"].abs().max()) == 0 and float(new["v_bias"].abs().max()) == 0
    scaling = 1 / math.sqrt(d // H)
    torch.testing.assert_close(_attention(x, new, H, scaling), _attention(x, w, H, scaling), rtol=1e-5, atol=1e-5)


def test_attention_si_reduced_heads_are_best_rank_r_forms():
    d, H, r_qk, r_ov = 24, 3, 3, 5
    w = _random_attention(d, H, 2)
    new = fnl.attention_spectral_init(num_heads=H, qk_rank=r_qk, ov_rank=r_ov, **w)
    hd = d // H
    for h in range(H):
        # QK form on [x, 1]: [W_q,h | b_q,h]^T W_k,h, truncated to rank r_qk
        Aq = torch.cat([w["q_weight"][h * hd : (h + 1) * hd], w["q_bias"][h * hd : (h + 1) * hd, None]], 1)
        u, s, vh = torch.linalg.svd(Aq.T.double() @ w["k_weight"][h * hd : (h + 1) * hd].double())
        ref = u[:, :r_qk] @ torch.diag(s[:r_qk]) @ vh[:r_qk]
        Aq2 = torch.cat([new["q_weight"][h * r_qk : (h + 1) * r_qk], new["q_bias"][h * r_qk : (h + 1) * r_qk, None]], 1)
        got = Aq2.T.double() @ new["k_weight"][h * r_qk : (h + 1) * r_qk].double()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        head = slice(h * hd, (h + 1) * hd)
        u, s, vh = torch.linalg.svd(w["o_weight"][:, head].double() @ w["v_weight"][head].double())
        ref = u[:, :r_ov] @ torch.diag(s[:r_ov]) @ vh[:r_ov]
        small = slice(h * r_ov, (h + 1) * r_ov)
        got = new["o_weight"][:, small].double() @ new["v_weight"][small].double()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new["o_bias"], w["o_bias"] + w["o_weight"] @ w["v_bias"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_heads=5), "q_weight: 16 output features do not divide into 5 heads"),
        (dict(num_heads=4, qk_rank=5), r"qk_rank 5 does not fit .*dimension 4 and can only shrink.*\[1, 4\]"),
        (dict(num_heads=4, ov_rank=0), r"ov_rank 0 does not fit .*\[1, 4\]"),
        (dict(num_heads=4, num_kv_heads=2), "one key/value head per query head"),
    ],
)
def test_attention_si_bad_input(kwargs, match):
    w = _random_attention(16, 4, 3)
    with pytest.raises(ValueError, match=match):
        fnl.attention_spectral_init(**w, **kwargs)


def test_import_does_not_pull_fairseq_or_transformers():
    import subprocess
    import sys

    code = "import sys, fnl_transformers; bad=[m for m in ('fairseq','transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
