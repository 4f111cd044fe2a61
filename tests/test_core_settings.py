"""The core settings model, decay policy, shape-only rank planning and attention surgery.

Tolerances: float64 attention math compared to 1e-10 (summation order only); float32 FD gradients 1e-6 relative."""

import math

import pytest
import torch
from torch import nn

import fnl_transformers as fnl
from fnl_transformers.core import (
    FD,
    NO_DECAY,
    WEIGHT_DECAY,
    DecayPolicy,
    FDSpec,
    HeadDims,
    SettingsError,
    StructureSpec,
    form_memberships,
    forms_from_memberships,
    head_products,
    pad_heads,
    plan_ranks,
    shrink_heads,
    specific_head_dims,
)
from fnl_transformers.core.settings import flag


# ------------------------------------------------------------------------------------------------ settings
def test_structure_defaults_and_head_dim_rule():
    s = StructureSpec()
    assert (s.rank_scale, s.factorize, s.ranks, s.spectral_init, s.deep) == (
        None,
        ("ffn", "embedding"),
        {},
        True,
        False,
    )
    assert s.head_dims(64) == (64, 64)
    assert StructureSpec(head_dim_qk=16).head_dims(64) == (16, 64)
    # 'attention' in factorize: heads shrink to max(1, int(R * head_dim)) (floor), the specific dim wins
    a = StructureSpec(rank_scale=0.3, factorize="ffn,attention", head_dim_ov=5)
    assert a.factorize == ("ffn", "attention") and a.head_dims(64) == (19, 5)  # int(19.2) = 19
    assert StructureSpec(rank_scale=0.01, factorize=("attention",)).head_dims(64) == (1, 1)
    assert specific_head_dims(8, None, 4) == (8, 4) and specific_head_dims(None, None, None) == (None, None)


@pytest.mark.parametrize(
    "chosen, shrinks, init",
    [
        (None, True, "spectral"),
        (None, False, None),
        (True, True, "spectral"),
        (True, False, "spectral"),
        (False, True, "random"),
        (False, False, None),
    ],
)
def test_head_init_rule(chosen, shrinks, init):
    assert StructureSpec(spectral_init_qk=chosen).head_init("qk", shrinks) == init
    # None follows spectral_init where the heads shrink
    if chosen is None and shrinks:
        assert StructureSpec(spectral_init=False).head_init("qk", True) == "random"


def test_activation_aware_init_rule_and_checks():
    s = StructureSpec(rank_scale=0.5, activation_aware=True, damping=0)
    assert s.layer_init == "activation" and s.damping == 0.0
    # per-head: activation-aware where heads shrink; a full-size head re-balanced by SI stays weight-space SI
    assert (s.head_init("qk", True), s.head_init("qk", False)) == ("activation", None)
    t = StructureSpec(head_dim_ov=8, activation_aware=True, spectral_init_qk=True, spectral_init_ov=False)
    assert (t.head_init("qk", False), t.head_init("ov", True)) == ("spectral", "random")
    assert StructureSpec(rank_scale=0.5).layer_init == "spectral"
    for kwargs, message in [
        (
            dict(rank_scale=0.5, activation_aware=True, spectral_init=False),
            r"activation_aware is spectral "
            r"initialization .* needs spectral_init",
        ),
        (dict(activation_aware=True), r"activation_aware truncates nothing: give rank_scale"),
        (dict(rank_scale=0.5, damping=0.1), r"damping applies to activation-aware truncation only"),
        (dict(rank_scale=0.5, activation_aware=True, damping=-1), r"damping must be a finite number >= 0"),
        (dict(rank_scale=0.5, activation_aware=1), r"activation_aware must be True or False"),
    ]:
        with pytest.raises(SettingsError, match=message):
            StructureSpec(**kwargs)


def test_fd_spec_defaults_and_check():
    assert FDSpec(linear=0.1).coefficients() == {"linear": 0.1, "embedding": 0.1, "qk": 0.0, "ov": 0.0}
    assert FDSpec(linear=0.1, embedding=0).coefficients()["embedding"] == 0.0
    assert FDSpec(qk=1).active == ("qk",) and FDSpec(qk=1).coupled and not FDSpec(qk=1).decoupled
    assert FDSpec(qk=1, mode="decoupled").decoupled and not FDSpec(mode="decoupled").decoupled
    FDSpec(linear=0.1).check_present({"linear"})  # covers the embeddings too while fd_embedding is None
    with pytest.raises(SettingsError, match=r"fd_linear > 0 but the model has no embedding/linear forms"):
        FDSpec(linear=0.1).check_present({"qk", "ov"})
    with pytest.raises(SettingsError, match=r"fd_embedding > 0 but the model has no embedding forms"):
        FDSpec(embedding=0.1).check_present({"linear", "qk"})


def test_errors_are_spelled_by_the_converter():
    with pytest.raises(SettingsError) as e:
        StructureSpec(deep=True)
    assert str(e.value).startswith("deep needs rank_scale, ranks or target_param_ratio")
    assert str(e.value.spelled(flag)).startswith("--deep needs --rank-scale, --ranks or --target-param-ratio")
    with pytest.raises(ValueError, match=r"fd_ov must be a finite number >= 0"):
        FDSpec(ov=math.inf)
    with pytest.raises(ValueError, match=r"FD coefficient for 'qk' must be a finite number >= 0"):
        fnl.check_fd_coefficients(qk=-1)
    with pytest.raises(
        ValueError,
        match=r"head_dim_qk 9 does not fit enc: its heads have dimension 8 and can only "
        r"shrink; use an integer in \[1, 8\]",
    ):
        StructureSpec(head_dim_qk=9).head_dims(8, where="enc")
    with pytest.raises(ValueError, match=r"ranks: keys must be module-name patterns"):
        StructureSpec(ranks={"": 3})
    assert StructureSpec(ranks="*.fc1=4, *.fc2=5").ranks == {"*.fc1": 4, "*.fc2": 5}


def test_empty_factorize_is_refused_not_a_silent_no_op():
    with pytest.raises(
        SettingsError,
        match=r"factorize must name at least one part among \['ffn', 'embedding', "
        r"'position', 'attention'\], got \(\)",
    ):
        StructureSpec(rank_scale=0.5, factorize=())


# ------------------------------------------------------------------------------------------------ ranks
def test_layers_that_grow_are_one_warning_unless_overcomplete_on_purpose():
    """r (m + n) > m n: a rank of 10000 (or 14 of a 16 x 16 layer) grows the layer; named with its growth."""
    import warnings

    layers = [("l0.fc1", 64, 16), ("l0.fc2", 16, 16)]
    with pytest.warns(
        UserWarning,
        match=r"^2 factorized layer\(s\) get more parameters than their dense weights "
        r"\(l0.fc1 rank 10000 of 64 x 16: 1,024 -> 800,000 parameters; l0.fc2 rank "
        r"14 of 16 x 16: 256 -> 448 parameters; \+799,168 in all\)",
    ):
        plan_ranks(layers, StructureSpec(rank_scale=0.9, ranks={"*.fc1": 10000}), 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_ranks(layers, StructureSpec(rank_scale=1.5), 10_000)  # a rank scale >= 1 asks for overcomplete factors
        plan_ranks(layers, StructureSpec(ranks={"*": 100}, deep=True), 10_000)  # so does deep
        plan_ranks(layers, StructureSpec(rank_scale=0.5), 10_000)  # 8 (64 + 16) < 1024, 8 (16 + 16) < 256
    with pytest.warns(UserWarning, match=r"^1 factorized layer\(s\) .*l0.fc1 rank 10000"):
        plan_ranks(layers, StructureSpec(rank_scale=1.5, ranks={"*.fc1": 10000}), 10_000)  # explicit: not scaled


def test_plan_ranks_patterns_scale_and_budget():
    layers = [("l0.fc1", 64, 16), ("l0.fc2", 16, 64), ("emb", 100, 16)]
    s = StructureSpec(rank_scale=0.5, ranks={"*.fc2": 3, "l*.fc*": 7})  # first match wins
    assert plan_ranks(layers, s, 10_000) == {"l0.fc1": 7, "l0.fc2": 3, "emb": 8}
    assert plan_ranks(layers, StructureSpec(ranks={"emb": 2}), 10_000) == {"emb": 2}  # no scale: only explicit
    with pytest.raises(SettingsError, match=r"ranks: pattern\(s\) \['x\*'\] match no layer"):
        plan_ranks(layers, StructureSpec(ranks={"x*": 2}), 10_000)
    # budget: the largest scale whose count fits, by brute force over the reachable scales
    total = 64 * 16 * 2 + 100 * 16 + 500
    s = StructureSpec(target_param_ratio=0.6)
    ranks = plan_ranks(layers, s, total)
    count = lambda rk: 500 + sum(r * (m + n) for (_, m, n), r in zip(layers, rk))  # noqa: E731
    got = count([ranks[n] for n, _, _ in layers])
    assert got <= 0.6 * total
    reachable = {count([fnl.rank_from_scale(m, n, k / 1000) for _, m, n in layers]) for k in range(1, 2000)}
    assert got == max(c for c in reachable if c <= 0.6 * total)
    with pytest.raises(SettingsError, match="unreachable"):
        plan_ranks(layers, StructureSpec(target_param_ratio=0.05), total)


def test_budget_function_matches_the_model_ratio_function():
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))
    total = sum(p.numel() for p in model.parameters())
    by_model = fnl.rank_scale_for_param_ratio(model, 0.5)
    by_shapes = fnl.rank_scale_for_budget([(48, 32), (32, 48)], total - 2 * 48 * 32, 0.5 * total)
    assert by_model == by_shapes


# ------------------------------------------------------------------------------------------------ policy
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.ffn = fnl.FactorizedLinear(8, 6, 3, deep=True)
        self.emb = fnl.FactorizedEmbedding(10, 8, 4)
        self.att = nn.ModuleDict({k: nn.Linear(8, 8) for k in "qkvo"})
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)
        fnl.register_attention_forms(
            self.att, fnl.attention_form_specs("q.weight", "k.weight", "v.weight", "o.weight", 2)
        )


@pytest.mark.parametrize("wdf, dbn", [(True, False), (False, False), (True, True)])
def test_decay_policy_rule(wdf, dbn):
    net = Net()
    got = {name: d for name, _, d in DecayPolicy(FDSpec(linear=0.1, embedding=0, ov=0.1), wdf, dbn).assign(net)}
    factor_wo_fd = WEIGHT_DECAY if wdf else NO_DECAY
    bias_norm = WEIGHT_DECAY if dbn else NO_DECAY
    expected = {
        "ffn.U": FD,
        "ffn.V": FD,
        "ffn.M": FD,
        "ffn.bias": bias_norm,
        "emb.U": factor_wo_fd,
        "emb.V": factor_wo_fd,
        "att.q.weight": factor_wo_fd,
        "att.k.weight": factor_wo_fd,
        "att.v.weight": FD,
        "att.o.weight": FD,
        "norm.weight": bias_norm,
        "norm.bias": bias_norm,
        "head.weight": WEIGHT_DECAY,
        "head.bias": bias_norm,
    }
    expected.update({f"att.{k}.bias": bias_norm for k in "qkvo"})
    assert got == expected


def test_form_memberships_rebuild_the_forms_on_any_parameter_list():
    """Memberships recorded per parameter rebuild FormSpecs on a list of copies (as fp32 master copies) whose FD
    gradients equal the core's on the model."""
    torch.manual_seed(0)
    net = Net()
    members = form_memberships(net, ("linear", "embedding", "qk", "ov"))
    params = list(net.parameters())[::-1]  # any order
    copies = [p.detach().clone() for p in params]
    specs = forms_from_memberships([members.get(id(p)) for p in params])
    assert len(specs) == 4 and sorted(s.kind for s in specs) == ["embedding", "linear", "ov", "qk"]
    coeffs = {"linear": 0.1, "embedding": 0.2, "qk": 0.3, "ov": 0.4}
    got = fnl.accumulate_fd_grads(specs, copies.__getitem__, coeffs)
    want = fnl.fd_grads(net, **coeffs)
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(params[i])] for i, c in enumerate(copies) if id(c) in got} == set(want)
    for i, c in enumerate(copies):
        if id(c) in got:
            torch.testing.assert_close(got[id(c)], want[names[id(params[i])]], rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match=r"lacks its factor\(s\) \['b'\]"):
        forms_from_memberships([members[id(net.ffn.U)]])


# ------------------------------------------------------------------------------------------------ heads
def _attention_tensors(H=4, d=12, hd=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {
        "q_weight": r(H * hd, d),
        "q_bias": r(H * hd),
        "k_weight": r(H * hd, d),
        "k_bias": r(H * hd),
        "v_weight": r(H * hd, d),
        "v_bias": r(H * hd),
        "o_weight": r(d, H * hd),
        "o_bias": r(d),
    }


def _attend(x, t, H, scaling):
    dq, dv = t["q_weight"].shape[0] // H, t["v_weight"].shape[0] // H
    lin = lambda z, w, b: z @ w.T + (0 if b is None else b)  # noqa: E731
    q = lin(x, t["q_weight"], t["q_bias"]).view(-1, H, dq).transpose(0, 1) * scaling
    k = lin(x, t["k_weight"], t["k_bias"]).view(-1, H, dq).transpose(0, 1)
    v = lin(x, t["v_weight"], t["v_bias"]).view(-1, H, dv).transpose(0, 1)
    a = torch.softmax(q @ k.transpose(1, 2), -1) @ v
    return lin(a.transpose(0, 1).reshape(x.shape[0], H * dv), t["o_weight"], t["o_bias"])


def test_shrink_then_pad_is_the_same_attention():
    """Shrunk heads (random init for QK, SI for OV) zero-padded back, with a score-scaling fold, compute what the
    shrunk attention computes; head_products includes the query-bias column."""
    H, d, hd = 4, 12, 3
    t = _attention_tensors(H, d, hd)
    dims = HeadDims(H, H, hd, 2, 1)
    shapes = {}

    def fresh(key, shape, like):
        shapes[key] = shape
        return torch.randn(shape, dtype=like.dtype)

    small = shrink_heads(t, dims, "random", "spectral", fresh)
    assert shapes == {"q_weight": (8, d), "q_bias": (8,), "k_weight": (8, d), "k_bias": (8,)}
    assert small["v_weight"].shape == (H, d) and small["o_weight"].shape == (d, H)
    x = torch.randn(5, d, dtype=torch.float64)
    expected = _attend(x, small, H, 0.37)
    padded = pad_heads(small, dims, fold=0.37 / hd**-0.5)
    assert padded["q_weight"].shape == (H * hd, d) and padded["o_weight"].shape == (d, H * hd)
    torch.testing.assert_close(_attend(x, padded, H, hd**-0.5), expected, rtol=1e-10, atol=1e-10)
    qk = head_products(t, dims.full)["qk"]
    h = 1
    rows = slice(h * hd, (h + 1) * hd)
    manual = torch.cat([t["q_weight"][rows], t["q_bias"][rows, None]], 1).T @ t["k_weight"][rows]
    torch.testing.assert_close(qk[h], manual, rtol=1e-12, atol=1e-12)


def test_shrink_heads_keeps_untouched_forms_and_needs_an_init_where_heads_shrink():
    t = _attention_tensors()
    same = shrink_heads(t, HeadDims(4, 4, 3, 3, 3), None, None)
    assert all(same[k] is t[k] for k in t)
    si = shrink_heads(t, HeadDims(4, 4, 3, 3, 3), "spectral", None)  # full-rank SI re-balances QK only
    assert si["v_weight"] is t["v_weight"] and si["q_weight"] is not t["q_weight"]
    assert torch.equal(si["k_bias"], torch.zeros(12, dtype=torch.float64))  # softmax-invariant: dropped
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(_attend(x, si, 4, 0.5), _attend(x, t, 4, 0.5), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="the QK heads shrink from 3 to 2: choose their initialization"):
        shrink_heads(t, HeadDims(4, 4, 3, 2, 3), None, None)
