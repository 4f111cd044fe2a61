"""Batched FD (all forms of a model in grouped calls) against the per-module computation and dense float64 math.

One model mixes every case the grouping must keep apart or together: several attention layers of one shape
(a group of many forms, QK and OV together), grouped-query attention, reduced heads (QK and OV head dims
below d / H and different from each other), a fused transposed projection shared by both kinds, factorized
linears of equal and different shapes, a deep factorization ``U M V^T``, an overcomplete layer (dense route),
an embedding, and half-precision factors (computed in float32). Tolerance 1e-6 relative (Frobenius norm),
both ways of running a group (stacked copies, in place).
"""

import pytest
import torch
from torch import nn

import fnl_transformers as fnl
from fnl_transformers.core import batched
from fnl_transformers.core.frobenius import form_sq_norms
from fnl_transformers.optim import param_groups
from fnl_transformers.optim._fd import group_forms

RTOL = 1e-6
COEFFS = dict(linear=0.3, embedding=0.2, qk=0.05, ov=0.07)


class Attention(nn.Module):
    """q/k/v/o in nn.Linear layout with H query heads, G key/value heads and separate QK / OV head dims."""

    def __init__(self, d, H, G, dqk, dov):
        super().__init__()
        self.q, self.k = nn.Linear(d, H * dqk), nn.Linear(d, G * dqk)
        self.v, self.o = nn.Linear(d, G * dov), nn.Linear(H * dov, d)
        specs = fnl.attention_form_specs("q.weight", "k.weight", "v.weight", "o.weight", H, G)
        fnl.register_attention_forms(self, specs)


class Fused(nn.Module):
    """GPT-2 layout: one Conv1D-style ``c_attn`` (d x 3d) read by both kinds through row slices."""

    def __init__(self, d, H):
        super().__init__()
        self.c_attn = nn.Parameter(torch.randn(d, 3 * d) / d**0.5)
        self.c_proj = nn.Parameter(torch.randn(d, d) / d**0.5)
        fnl.register_attention_forms(
            self,
            fnl.attention_form_specs(
                "c_attn",
                "c_attn",
                "c_attn",
                "c_proj",
                H,
                transposed=True,
                q_slice=(0, d),
                k_slice=(d, 2 * d),
                v_slice=(2 * d, 3 * d),
            ),
        )


def mixed_model(seed=0):
    torch.manual_seed(seed)
    deep = fnl.FactorizedLinear(12, 10, 4, deep=True)
    with torch.no_grad():
        deep.M.add_(0.3 * torch.randn(4, 4))
    half = nn.ModuleList([fnl.FactorizedLinear(16, 24, 4), fnl.FactorizedLinear(16, 24, 4)])
    half[0].half()
    half[1].bfloat16()
    return nn.ModuleDict(
        dict(
            layers=nn.ModuleList([Attention(16, 4, 4, 4, 4) for _ in range(3)]),  # one shape: QK and OV of 3 layers
            gqa=nn.ModuleList([Attention(16, 4, 2, 4, 4) for _ in range(2)]),
            reduced=Attention(16, 4, 4, 3, 2),
            fused=Fused(12, 3),
            ffn=nn.ModuleList(
                [fnl.FactorizedLinear(16, 24, 5), fnl.FactorizedLinear(16, 24, 5), fnl.FactorizedLinear(24, 16, 5)]
            ),
            deep=deep,
            wide=fnl.FactorizedLinear(6, 5, 9),  # overcomplete: the dense product is the cheaper route
            emb=fnl.FactorizedEmbedding(30, 16, 6),
            lowp=half,
        )
    )


def _close(a, b, rtol=RTOL, what=""):
    a, b = a.detach().double(), b.detach().double()
    err, scale = float((a - b).norm()), float(b.norm())
    assert err <= rtol * max(scale, 1e-30), f"{what}: |a - b| = {err:.3e}, |b| = {scale:.3e}"


def per_module_penalty(model, coeffs):
    """The per-module computation: each form on its own (form_sq_norms), summed per kind."""
    out = {}
    for _, _, spec, bound in fnl.iter_forms(model):
        if coeffs.get(spec.kind):
            value = form_sq_norms(bound).sum() * (coeffs[spec.kind] / 2)
            out[spec.kind] = out[spec.kind] + value if spec.kind in out else value
    return out


def dense_penalty(model, coeffs):
    """Float64 reference through every dense head product ``W_h = A_h M B_g(h)^T``."""
    total = torch.zeros((), dtype=torch.float64)
    for _, _, spec, f in fnl.iter_forms(model):
        A = f.A.double() if f.M is None else f.A.double() @ f.M.double()
        B = f.B.double().repeat_interleave(A.shape[0] // f.B.shape[0], 0)
        total = total + coeffs[spec.kind] / 2 * (A @ B.transpose(1, 2)).pow(2).sum()
    return total


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(params=["stacked", "in place"])
def mode(request, monkeypatch):
    monkeypatch.setattr(batched, "STACK_MAX_ELEMENTS", 1 << 30 if request.param == "stacked" else 0)
    batched._SPEC_PLANS.clear()
    yield request.param
    batched._SPEC_PLANS.clear()


def test_plan_groups_forms_across_kinds_and_modules(mode):
    model = mixed_model()
    plan, tensors = batched.model_plan(model, fnl.KINDS)
    assert len(plan) == len(list(fnl.iter_forms(model)))
    sizes = sorted(len(g.slots) for g in plan.groups)
    assert max(sizes) == 6  # QK and OV of the three equal attention layers: one group
    assert any(g.product for g in plan.groups) and any(g.deep for g in plan.groups)
    assert {g.stacked for g in plan.groups if len(g.slots) > 1 and not g.product} == {mode == "stacked"}
    assert len(tensors) == len({id(t) for t in tensors})  # each parameter once (c_attn serves two kinds)
    again, _ = batched.model_plan(model, fnl.KINDS)
    assert again is plan  # cached
    model.reduced.q = nn.Linear(16, 8)  # a replaced parameter of another shape: a new plan
    model.reduced.k = nn.Linear(16, 8)
    assert batched.model_plan(model, fnl.KINDS)[0] is not plan


def test_batched_penalty_and_gradients_match_per_module(mode):
    model = mixed_model()
    got = fnl.frobenius_penalty_by_kind(model, **COEFFS)
    ref = per_module_penalty(model, COEFFS)
    assert set(got) == set(ref) == set(fnl.KINDS)
    for kind in ref:
        _close(got[kind], ref[kind], what=f"penalty {kind}")
    g_got = grads_of(model, fnl.frobenius_penalty(model, **COEFFS))
    g_ref = grads_of(model, torch.stack(list(per_module_penalty(model, COEFFS).values())).sum())
    assert set(g_got) == set(g_ref)
    params = dict(model.named_parameters())
    for name in g_ref:
        assert g_got[name].dtype == params[name].dtype
        # half-precision gradients are rounded to their dtype after float32 math: compare at its precision
        rtol = RTOL if params[name].dtype in (torch.float32, torch.float64) else 2.0**-8
        _close(g_got[name], g_ref[name], rtol, what=f"autograd grad {name}")
    # decoupled route (float32 buffers, also for half-precision factors): fd_grads and an optimizer group
    closed = fnl.fd_grads(model, **COEFFS)
    g_ref32 = {}
    for kind in COEFFS:  # per-module closed form, float32 for every parameter
        for _, module, spec, bound in fnl.iter_forms(model, (kind,)):
            dA, dB, dM = fnl.form_grads(bound)
            get = fnl.core.forms.module_lookup(module)
            for view, key, g in ((spec.a, spec.a.key, dA), (spec.b, spec.b.key, dB), (None, spec.m, dM)):
                if key is None:
                    continue
                name = next(n for n, p in model.named_parameters() if p is get(key))
                buf = g_ref32.setdefault(name, torch.zeros_like(get(key), dtype=torch.float32))
                (buf if view is None else view.view(buf)).add_(g, alpha=COEFFS[kind])
    assert set(closed) == set(g_ref32)
    for name in g_ref32:
        assert closed[name].dtype == torch.float32
        _close(closed[name], g_ref32[name], what=f"fd_grads {name}")
    groups = param_groups(
        model, fd_linear=COEFFS["linear"], fd_embedding=COEFFS["embedding"], fd_qk=COEFFS["qk"], fd_ov=COEFFS["ov"]
    )
    forms = group_forms(groups[0])
    by_id = forms.add_to({})
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in by_id} == set(g_ref32)
    for i, g in by_id.items():
        _close(g, g_ref32[names[i]], what=f"optimizer group {names[i]}")


def test_batched_matches_dense_float64(mode):
    model = mixed_model(seed=1)
    del model["lowp"]
    got = fnl.frobenius_penalty(model, **COEFFS)
    ref = dense_penalty(model, COEFFS)
    _close(got, ref, 1e-5, "penalty")
    g_got = grads_of(model, got)
    g_ref = grads_of(model, ref)
    for name in g_ref:
        _close(g_got[name], g_ref[name], 1e-5, name)


def test_accumulate_adds_into_given_buffers(mode):
    """Buffers passed in ``out`` (e.g. an optimizer's update direction) receive the gradients in place."""
    model = mixed_model(seed=2)
    del model["lowp"]
    groups = param_groups(model, fd_linear=0.3, fd_qk=0.05, fd_ov=0.07)
    forms = group_forms(groups[0])
    fresh = forms.add_to({})
    start = {i: torch.randn_like(g) for i, g in fresh.items()}
    given = {i: t.clone() for i, t in start.items()}
    ptrs = {i: t.data_ptr() for i, t in given.items()}
    forms.add_to(given)
    for i in fresh:
        assert given[i].data_ptr() == ptrs[i]
        _close(given[i], start[i] + fresh[i], what=str(i))


def test_kinds_switched_off_and_coefficients_change(mode):
    model = mixed_model(seed=3)
    del model["lowp"]
    only_ov = fnl.frobenius_penalty_by_kind(model, ov=0.5)
    assert set(only_ov) == {"ov"}
    _close(only_ov["ov"], per_module_penalty(model, {"ov": 0.5})["ov"], what="ov")
    for lam in (0.1, 0.4):  # same plan, new weights
        _close(
            fnl.frobenius_penalty(model, qk=lam, ov=lam),
            dense_penalty(model, dict(COEFFS, qk=lam, ov=lam, linear=0, embedding=0)),
            1e-5,
        )


def test_float64_and_float32_forms_in_one_model(mode):
    model = mixed_model(seed=4)
    del model["lowp"]
    model["ffn"][2].double()  # one float64 form among float32 ones: computed in float64, the rest in float32
    got = fnl.frobenius_penalty_by_kind(model, **COEFFS)
    assert got["linear"].dtype == torch.float64
    ref = per_module_penalty(model, COEFFS)
    for kind in ref:
        _close(got[kind], ref[kind], what=kind)
    g_got = grads_of(model, fnl.frobenius_penalty(model, **COEFFS))
    g_ref = grads_of(model, torch.stack([v.double() for v in per_module_penalty(model, COEFFS).values()]).sum())
    for name in g_ref:
        assert g_got[name].dtype == g_ref[name].dtype
        _close(g_got[name], g_ref[name], what=name)
