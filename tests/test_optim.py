"""Optimizers: Lamb vs torch-optimizer and a transcription of NVIDIA's rule, FLAMBe/AdamWFD vs hand formulas."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fnl_transformers.core import FactorizedEmbedding, FactorizedLinear, attention_form_specs, register_attention_forms
from fnl_transformers.optim import AdamWFD, FLAMBe, Lamb, param_groups


class TinyAttention(nn.Module):
    """Multi-head self-attention with nn.Linear q/k/v/o and registered QK/OV forms."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.v, self.o = (nn.Linear(d, d) for _ in range(3))
        self.k = nn.Linear(d, d, bias=False)  # a key bias gets only rounding noise as gradient (softmax-invariant)
        register_attention_forms(self, attention_form_specs("q.weight", "k.weight", "v.weight", "o.weight", heads))

    def forward(self, x):  # x: B x T x d
        B, T, d = x.shape
        split = lambda t: t.view(B, T, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        att = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(att.transpose(1, 2).reshape(B, T, d))


class TinyNet(nn.Module):
    def __init__(self, vocab=11, d=8, heads=2):
        super().__init__()
        self.emb = FactorizedEmbedding(vocab, d, rank=3)
        self.att = TinyAttention(d, heads)
        self.norm = nn.LayerNorm(d)
        self.ffn = FactorizedLinear(d, 6, rank=2)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.norm(h + self.att(h))
        return self.head(torch.relu(self.ffn(h)))


def make_net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return TinyNet().to(dtype)


def batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 11, (4, 5), generator=g), torch.randn(4, 5, 3, generator=g, dtype=dtype)


def train_step(model, opt, step):
    ids, y = batch(step, next(model.parameters()).dtype)
    opt.zero_grad()
    F.mse_loss(model(ids), y).backward()
    opt.step()


def assert_rel_close(a, b, rel, what=""):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"{what}: max abs err {err:.3e} > {rel} x max |ref| {scale:.3e}"


# ---------------------------------------------------------------- Lamb vs references


def test_lamb_matches_torch_optimizer_50_steps():
    # float64: two implementations order their float operations differently; in float32 that alone gives
    # 1-2e-7 relative after 50 steps, depending on the thread count, while float64 gives 6e-16, far below 1e-10
    torch_optimizer = pytest.importorskip("torch_optimizer")
    ours, ref = make_net(dtype=torch.float64), make_net(dtype=torch.float64)
    with torch.no_grad():  # a zero tensor exercises the "trust ratio 1 when a norm is 0" rule in both
        ours.head.bias.zero_()
        ref.head.bias.zero_()
    kw = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    opt = Lamb(ours.parameters(), bias_correction=False, **kw)
    ref_opt = torch_optimizer.Lamb(ref.parameters(), clamp_value=1e4, debias=False, **kw)
    for step in range(50):
        train_step(ours, opt, step)
        train_step(ref, ref_opt, step)
    assert max(p.norm().item() for p in ref.parameters()) < 1e4  # clamp_value above every weight norm
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert_rel_close(a.detach(), b.detach(), 1e-10, name)
    assert not torch.equal(ours.head.weight, make_net(dtype=torch.float64).head.weight)  # it did move


def nvidia_lamb_reference(params, grads, state, step, lr, beta1, beta2, eps, weight_decay, max_grad_norm):
    """Transcription of apex's multi_tensor_lamb (NVIDIA BERT recipe, adam_w_mode=True, use_nvlamb=True,
    grad_averaging=True, bias_correction=True, one step count per group)."""
    global_grad_norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    clipped = global_grad_norm / max_grad_norm if global_grad_norm > max_grad_norm else 1.0
    beta1_correction = 1 - beta1**step
    beta2_correction = 1 - beta2**step
    updates = []
    for p, g in zip(params, grads):  # stage 1: per-element update
        m, v = state.setdefault(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
        scaled_grad = g / clipped
        m = beta1 * m + (1 - beta1) * scaled_grad
        v = beta2 * v + (1 - beta2) * scaled_grad * scaled_grad
        state[id(p)] = (m, v)
        next_m_unbiased = m / beta1_correction
        next_v_unbiased = v / beta2_correction
        denom = torch.sqrt(next_v_unbiased) + eps
        updates.append(next_m_unbiased / denom + weight_decay * p)
    for p, u in zip(params, updates):  # stage 2: per-tensor ratio
        param_norm, update_norm = float(p.norm()), float(u.norm())
        ratio = lr * (param_norm / update_norm) if param_norm != 0 and update_norm != 0 else lr
        p.sub_(ratio * u)


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_lamb_matches_nvidia_rule_with_bias_correction(max_grad_norm):
    ours, ref = make_net(dtype=torch.float64), make_net(dtype=torch.float64)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    opt = Lamb(ours.parameters(), bias_correction=True, max_grad_norm=max_grad_norm, **kw)
    state = {}
    clipped_once = False
    for step in range(1, 21):
        train_step(ours, opt, step)
        ids, y = batch(step, torch.float64)
        ref.zero_grad()
        F.mse_loss(ref(ids), y).backward()
        params = list(ref.parameters())
        grads = [p.grad for p in params]
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        clipped_once |= max_grad_norm is not None and norm > max_grad_norm
        with torch.no_grad():
            nvidia_lamb_reference(
                params,
                grads,
                state,
                step,
                kw["lr"],
                *kw["betas"],
                kw["eps"],
                kw["weight_decay"],
                max_grad_norm if max_grad_norm is not None else math.inf,
            )
    assert clipped_once == (max_grad_norm is not None)  # the pre-normalization branch was exercised
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert_rel_close(a.detach(), b.detach(), 1e-10, name)


def test_trust_ratio_is_one_for_zero_weights_and_clip_bounds_it():
    w = nn.Parameter(torch.zeros(3))
    opt = Lamb([w], lr=0.1, weight_decay=0.0)
    w.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()  # first step, bias corrected: r = g / (|g| + eps) = sign(g) (up to eps); q = 1 (||w|| = 0)
    torch.testing.assert_close(w.detach(), -0.1 * torch.sign(w.grad) * (w.grad.abs() / (w.grad.abs() + 1e-6)))

    w = nn.Parameter(torch.full((4,), 10.0))
    opt = Lamb([w], lr=0.1, weight_decay=0.0, trust_clip=2.0)
    w.grad = torch.ones(4)
    opt.step()  # ||w|| / ||r|| = 20 / 2 = 10, clipped to 2
    r = 1 / (1 + 1e-6)
    torch.testing.assert_close(w.detach(), torch.full((4,), 10.0 - 0.1 * 2.0 * r))


# ---------------------------------------------------------------- FLAMBe


def test_flambe_without_fd_is_lamb():
    a, b = make_net(), make_net()
    opt_a = FLAMBe(param_groups(a, weight_decay=0.01), lr=1e-2)
    opt_b = Lamb(param_groups(b, weight_decay=0.01), lr=1e-2)
    assert len(opt_a.param_groups) == 2 and all("fd_forms" not in g or not g["fd_forms"] for g in opt_a.param_groups)
    for step in range(10):
        train_step(a, opt_a, step)
        train_step(b, opt_b, step)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name  # bitwise: without FD groups FLAMBe runs Lamb's own step


def lamb_first_step(w, g, d, lr, eps):
    """Hand formula of one LAMB step from fresh state with bias correction: m_hat = g, v_hat = g^2."""
    r = g / (g.abs() + eps) + d
    q = w.norm() / r.norm() if w.norm() > 0 and r.norm() > 0 else 1.0
    return w - lr * q * r


def test_flambe_one_step_factorized_linear_hand_formula():
    torch.manual_seed(0)
    layer = FactorizedLinear(5, 4, rank=3).double()
    with torch.no_grad():
        layer.bias.normal_()
    lam, lr, eps = 0.3, 0.05, 1e-6
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = FLAMBe(param_groups(layer, fd_linear=lam, weight_decay=0.1), lr=lr, eps=eps)
    layer(torch.randn(7, 5, dtype=torch.float64)).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    opt.step()
    U, V = before["U"], before["V"]
    W = U @ V.T  # the dense product; FD = 1/2 ||W||_F^2
    expected = {
        "U": lamb_first_step(U, grads["U"], lam * (W @ V), lr, eps),  # dFD/dU = W V = U (V^T V)
        "V": lamb_first_step(V, grads["V"], lam * (W.T @ U), lr, eps),  # dFD/dV = W^T U
        "bias": lamb_first_step(before["bias"], grads["bias"], 0.0, lr, eps),  # bias: no decay at all
    }
    for name, p in layer.named_parameters():
        torch.testing.assert_close(
            p.detach(), expected[name], rtol=1e-12, atol=1e-12, msg=lambda m, name=name: name + m
        )


def test_flambe_one_step_deep_factorized_linear_hand_formula():
    torch.manual_seed(3)
    layer = FactorizedLinear(5, 4, rank=3, bias=False, deep=True).double()
    with torch.no_grad():
        layer.M.add_(0.3 * torch.randn(3, 3, dtype=torch.float64))  # M away from the identity
    lam, lr, eps = 0.2, 0.05, 1e-6
    U, M, V = (layer.U.detach().clone(), layer.M.detach().clone(), layer.V.detach().clone())
    opt = FLAMBe(param_groups(layer, fd_linear=lam), lr=lr, eps=eps)
    layer(torch.randn(7, 5, dtype=torch.float64)).pow(2).sum().backward()
    g = {n: p.grad.clone() for n, p in layer.named_parameters()}
    opt.step()
    W = U @ M @ V.T  # FD = 1/2 ||U M V^T||_F^2
    expected = {
        "U": lamb_first_step(U, g["U"], lam * (W @ V @ M.T), lr, eps),  # dFD/dU = W V M^T
        "M": lamb_first_step(M, g["M"], lam * (U.T @ W @ V), lr, eps),  # dFD/dM = U^T W V
        "V": lamb_first_step(V, g["V"], lam * (W.T @ U @ M), lr, eps),  # dFD/dV = W^T U M
    }
    for name, p in layer.named_parameters():
        torch.testing.assert_close(
            p.detach(), expected[name], rtol=1e-12, atol=1e-12, msg=lambda m, name=name: name + m
        )


def test_flambe_one_step_attention_ov_form_hand_formula():
    torch.manual_seed(1)
    d, H, hd = 8, 2, 4
    att = TinyAttention(d, H).double()
    lam, wd, lr, eps = 0.2, 0.01, 0.03, 1e-6
    groups = param_groups(att, fd_ov=lam, weight_decay=wd)  # FLAMBe on OV, regular decay elsewhere
    assert [len(g["params"]) for g in groups] == [2, 2, 3]
    opt = FLAMBe(groups, lr=lr, eps=eps)
    before = {n: p.detach().clone() for n, p in att.named_parameters()}
    att(torch.randn(3, 5, d, dtype=torch.float64)).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in att.named_parameters()}
    opt.step()
    Wo, Vw = before["o.weight"], before["v.weight"]
    dO, dV = torch.zeros_like(Wo), torch.zeros_like(Vw)
    for h in range(H):  # FD = 1/2 sum_h ||O_h V_h||_F^2, O_h = o.weight[:, head], V_h = v.weight[head, :]
        cols = slice(h * hd, (h + 1) * hd)
        Wh = Wo[:, cols] @ Vw[cols, :]
        dO[:, cols] = Wh @ Vw[cols, :].T
        dV[cols, :] = Wo[:, cols].T @ Wh
    expected = {
        "o.weight": lamb_first_step(Wo, grads["o.weight"], lam * dO, lr, eps),
        "v.weight": lamb_first_step(Vw, grads["v.weight"], lam * dV, lr, eps),
        "q.weight": lamb_first_step(before["q.weight"], grads["q.weight"], wd * before["q.weight"], lr, eps),
        "k.weight": lamb_first_step(before["k.weight"], grads["k.weight"], wd * before["k.weight"], lr, eps),
    }
    for name in ("q", "v", "o"):
        expected[f"{name}.bias"] = lamb_first_step(before[f"{name}.bias"], grads[f"{name}.bias"], 0.0, lr, eps)
    for name, p in att.named_parameters():
        torch.testing.assert_close(
            p.detach(), expected[name], rtol=1e-12, atol=1e-12, msg=lambda m, name=name: name + m
        )


# ---------------------------------------------------------------- AdamWFD


def test_adamwfd_without_fd_is_torch_adamw():
    a, b = make_net(), make_net()
    opt_a = AdamWFD(param_groups(a, weight_decay=0.05), lr=1e-2)
    opt_b = torch.optim.AdamW(param_groups(b, weight_decay=0.05), lr=1e-2, foreach=False)
    for step in range(20):
        train_step(a, opt_a, step)
        train_step(b, opt_b, step)
    # bitwise: AdamWFD's update without FD is torch's single-tensor AdamW update, the same elementwise operations
    # in the same order (no reduction, so no dependence on the thread count); a tolerance of a few ulps would not
    # help anyway, Adam divides rounding differences in small gradients by their own size
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_adamwfd_one_step_hand_formula():
    torch.manual_seed(2)
    layer = FactorizedLinear(5, 4, rank=3, bias=False).double()
    lam, lr, eps = 0.3, 0.05, 1e-8
    U, V = layer.U.detach().clone(), layer.V.detach().clone()
    opt = AdamWFD(param_groups(layer, fd_linear=lam), lr=lr, eps=eps)
    layer(torch.randn(7, 5, dtype=torch.float64)).pow(2).sum().backward()
    gU, gV = layer.U.grad.clone(), layer.V.grad.clone()
    opt.step()
    W = U @ V.T
    adam = lambda g: g / (g.abs() + eps)  # noqa: E731  first bias-corrected Adam step
    torch.testing.assert_close(layer.U.detach(), U - lr * lam * (W @ V) - lr * adam(gU), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.V.detach(), V - lr * lam * (W.T @ U) - lr * adam(gV), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- state_dict


@pytest.mark.parametrize("cls", [FLAMBe, AdamWFD])
def test_save_reload_mid_run_gives_identical_trajectory(cls):
    def make_opt(model):
        return cls(
            param_groups(model, fd_embedding=1e-2, fd_qk=1e-2, fd_ov=2e-2, fd_linear=1e-3, weight_decay=0.01), lr=1e-2
        )

    straight = make_net()
    opt = make_opt(straight)
    for step in range(12):
        train_step(straight, opt, step)

    first = make_net()
    opt1 = make_opt(first)
    for step in range(6):
        train_step(first, opt1, step)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only=True: the FD groups are plain data
    resumed = make_net(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = make_opt(resumed)
    opt2.load_state_dict(saved["opt"])
    for step in range(6, 12):
        train_step(resumed, opt2, step)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name  # bitwise: the same operations in the same order, state restored exactly


# ---------------------------------------------------------------- half-precision parameters

HALF_EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.mark.parametrize("dtype", list(HALF_EPS))
@pytest.mark.parametrize("cls", [Lamb, FLAMBe, AdamWFD])
def test_half_precision_parameters_are_updated_in_float32_and_rounded_once(cls, dtype):
    """fairseq's --memory-efficient-fp16/-bf16 hands the optimizer half-precision parameters: the moments are
    float32 and each step equals the float32 step of the same values, rounded once into the parameter (within half
    a unit in the last place of the dtype)."""
    fd = {} if cls is Lamb else dict(fd_embedding=1e-2, fd_qk=1e-2, fd_ov=2e-2, fd_linear=1e-3)
    half = make_net().to(dtype)
    opt = cls(param_groups(half, weight_decay=0.01, **fd), lr=1e-2)
    assert opt.supports_memory_efficient_fp16
    start = {n: p.detach().clone() for n, p in half.named_parameters()}
    for step in range(3):
        master = make_net()
        master.load_state_dict({k: v.float() for k, v in half.state_dict().items()})  # the same values in float32
        ref = cls(param_groups(master, weight_decay=0.01, **fd), lr=1e-2)
        ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # the same moments (float32, as the parameters)
        ids, y = batch(step)
        opt.zero_grad()
        F.mse_loss(half(ids).float(), y).backward()
        for p, q in zip(half.parameters(), master.parameters()):
            q.grad = p.grad.float()  # the same gradient values
        opt.step()
        ref.step()
        for (name, p), q in zip(half.named_parameters(), master.parameters()):
            assert p.dtype == dtype and opt.state[p]["exp_avg"].dtype == torch.float32, name
            tol = HALF_EPS[dtype] / 2 * q.detach().abs() + 1e-7  # one rounding (1e-7: fp16 subnormals)
            assert bool(((p.detach().float() - q.detach()).abs() <= tol).all()), name

    assert all(not torch.equal(p, start[n]) for n, p in half.named_parameters())  # every parameter moved

    # a reloaded state (torch casts it to the parameters' dtype) is float32 again at the next step
    again = cls(param_groups(half, weight_decay=0.01, **fd), lr=1e-2)
    again.load_state_dict(opt.state_dict())
    assert next(iter(again.state.values()))["exp_avg"].dtype == dtype
    train_step(half, again, 3)
    assert {s["exp_avg"].dtype for s in again.state.values()} == {torch.float32}


# ---------------------------------------------------------------- groups and bad input


def test_param_groups_split():
    net = make_net()
    groups = param_groups(net, fd_ov=1e-2, fd_linear=1e-3, fd_embedding=0.0, weight_decay=0.01)
    names = {id(p): n for n, p in net.named_parameters()}
    by = [sorted(names[id(p)] for p in g["params"]) for g in groups]
    assert by[0] == ["att.o.weight", "att.v.weight", "ffn.U", "ffn.V"]
    assert groups[0]["weight_decay"] == 0 and groups[0]["fd"] == {"linear": 1e-3, "ov": 1e-2}
    assert sorted(f["kind"] for f in groups[0]["fd_forms"]) == ["linear", "ov"]
    assert by[1] == ["att.k.weight", "att.q.weight", "emb.U", "emb.V", "head.weight"]  # fd 0 kinds: regular decay
    assert groups[1]["weight_decay"] == 0.01
    biases_norms = ["att.q.bias", "att.v.bias", "att.o.bias", "norm.weight", "norm.bias", "ffn.bias", "head.bias"]
    assert by[2] == sorted(biases_norms)
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))

    # fd_embedding None (the default) follows fd_linear
    groups = param_groups(net, fd_linear=1e-3, weight_decay=0.01)
    assert groups[0]["fd"] == {"linear": 1e-3, "embedding": 1e-3}
    assert sorted(names[id(p)] for p in groups[0]["params"]) == ["emb.U", "emb.V", "ffn.U", "ffn.V"]

    # weight_decay_factors=False: factors of forms without FD get no decay either
    groups = param_groups(
        net, fd_ov=1e-2, fd_linear=1e-3, fd_embedding=0.0, weight_decay=0.01, weight_decay_factors=False
    )
    by = [sorted(names[id(p)] for p in g["params"]) for g in groups]
    assert by[1] == ["head.weight"] and groups[1]["weight_decay"] == 0.01
    assert by[2] == sorted(biases_norms + ["att.k.weight", "att.q.weight", "emb.U", "emb.V"])


@pytest.mark.parametrize("cls", [Lamb, FLAMBe, AdamWFD])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1e-3), "lr must be in"),
        (dict(eps=-1e-8), "eps must be in"),
        (dict(weight_decay=-0.1), "weight_decay must be in"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\] must be in \[0.0, 1.0\)"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\] must be in"),
        (dict(lr=float("nan")), "lr must be in"),
    ],
)
def test_bad_hyperparameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(make_net().parameters(), **kwargs)


def test_bad_groups():
    net = make_net()
    with pytest.raises(ValueError, match=r"appears in param groups 0 and 1.*exactly one group"):
        FLAMBe([{"params": [net.head.weight]}, {"params": [net.head.weight, net.head.bias]}])
    with pytest.raises(ValueError, match="never both"):
        FLAMBe([dict(param_groups(net, fd_ov=1e-2)[0], weight_decay=0.01)])
    with pytest.raises(ValueError, match="use FLAMBe"):
        Lamb(param_groups(net, fd_ov=1e-2))
    with pytest.raises(ValueError, match="fd_qk must be a finite number >= 0"):
        param_groups(net, fd_qk=-1.0)
    with pytest.raises(ValueError, match="weight_decay must be in"):
        param_groups(net, weight_decay=-0.01)
    with pytest.raises(ValueError, match="not a parameter of `model`"):
        param_groups(net, params=[nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="trust_clip"):
        Lamb(net.parameters(), trust_clip=0.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        Lamb(net.parameters(), max_grad_norm=-1.0)
    opt = FLAMBe(param_groups(net, fd_ov=1e-2))
    n = len(opt.param_groups)
    with pytest.raises(ValueError, match="appears in param groups 0 and 3"):
        opt.add_param_group({"params": [net.att.v.weight]})
    with pytest.raises(ValueError, match="lr must be in"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": -1.0})
    assert len(opt.param_groups) == n  # rejected groups are not kept


# ---------------------------------------------------------------- batched update paths


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_lamb_large_tensor_path_equals_foreach_path(monkeypatch, max_grad_norm):
    """Tensors above FOREACH_MAX_ELEMENTS are updated one at a time in a reused workspace, the others together
    with torch._foreach_*; both run the same operations, so results are identical whatever the split."""
    from fnl_transformers.optim import lamb as lamb_module

    def run(limit):
        monkeypatch.setattr(lamb_module, "FOREACH_MAX_ELEMENTS", limit)
        net = make_net()
        opt = FLAMBe(
            param_groups(net, fd_ov=1e-2, fd_linear=1e-3, weight_decay=0.01), lr=1e-2, max_grad_norm=max_grad_norm
        )
        ptrs = []
        for step in range(8):
            train_step(net, opt, step)
            ptrs.append(sorted(t.data_ptr() for t in opt._workspace().values()))
        return net, ptrs

    together, _ = run(1 << 30)
    alone, ptrs = run(0)
    assert ptrs[0] and all(p == ptrs[0] for p in ptrs)  # the workspace is allocated once and reused
    for (name, p), q in zip(together.named_parameters(), alone.parameters()):
        assert torch.equal(p, q), name


def test_lamb_matches_torch_optimizer_on_large_tensors():
    """The workspace path (tensors above FOREACH_MAX_ELEMENTS) against torch-optimizer's Lamb."""
    torch_optimizer = pytest.importorskip("torch_optimizer")
    from fnl_transformers.optim.lamb import FOREACH_MAX_ELEMENTS

    torch.manual_seed(0)
    shapes = [(FOREACH_MAX_ELEMENTS + 7,), (300, 300), (5,)]
    ours = [nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    opt = Lamb(ours, bias_correction=False, **kw)
    ref_opt = torch_optimizer.Lamb(ref, clamp_value=1e4, debias=False, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        assert_rel_close(a.detach(), b.detach(), 1e-6, str(tuple(a.shape)))
