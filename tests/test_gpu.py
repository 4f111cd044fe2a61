"""The core, FNLTrainer and the fairseq plugin on a CUDA GPU, in half precision.

Every test takes ``device``: the ``cuda`` cases carry the ``gpu`` marker (``pytest -m gpu`` selects them; where
torch sees no GPU they are skipped with the reason, tests/conftest.py), the ``cpu`` cases run the same checks
here, so the test logic is known to work before any GPU time is spent.

Tolerances (relative Frobenius errors against float64 on the CPU, from the half-precision weights upcast):

* SI (paper Definition 3.1) of fp16/bf16 weights computes in float32 and returns factors in the weight's dtype
  on its device: ``U V^T`` equals the float64 best rank-r approximation within ``eps`` of the dtype
  (fp16 eps 9.8e-4, bf16 eps 7.8e-3; measured on CPU: 0.3 eps, the factors rounded once), and so do the
  per-head QK/OV products of per-head SI (Sec. 2.3, Eq. (1)) and the folded output bias.
* FD (Definition 3.2) of fp16/bf16 factors: the penalty (float32) within 1e-5 of the float64 dense products; its
  gradient in float32 (``fd_grads``, the decoupled route) within 1e-5; the gradient autograd leaves in the
  half-precision ``.grad`` within ``eps`` (one rounding).
* FNLTrainer with bf16 / fp16 on the device against float32 on the same device after ``N_STEPS`` updates:
  the CPU tolerances of ``precision_helpers.AFTER_N``.
* fairseq: a few updates of a tiny fnl model in float32, ``--fp16`` (coupled FD; fairseq's ``adam``, and
  ``fnl_adam`` with weight decay) and ``--bf16`` (``flambe``, decoupled FD), then ``fnl recompose`` of the
  device-trained checkpoint on the CPU and stock ``fairseq-generate`` on it.
* fairseq mixed precision on CUDA: the checks of ``fairseq_precision_helpers`` (tolerances there) for every
  precision (``--fp16``, ``--bf16``, ``--memory-efficient-fp16/-bf16``, ``--amp``) x {``fnl_adam`` with weight
  decay, ``flambe``}: groups, first-update FD value / gradient / scaling against float32 on the device, an
  overflowing update skipped with its FD, 50 ``--bf16`` updates against float32 (tolerances measured on the CPU),
  and FD in float32 under CUDA autocast. Their CPU cases are ``test_fairseq_mixed_precision.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from precision_helpers import dense_fd64, rel_err
from torch import nn

from fnl_transformers.core import (
    FactorizedLinear,
    attention_form_specs,
    attention_spectral_init,
    fd_grads,
    frobenius_penalty,
    head_spectral_init,
    register_attention_forms,
    spectral_init,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
HALF = [torch.float16, torch.bfloat16]
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _weight(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(device=device, dtype=dtype)


def _best_rank_r64(W: torch.Tensor, r: int) -> torch.Tensor:
    W = W.detach().to("cpu", torch.float64)
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vh[:r]


def _prod64(A, B):
    return A.detach().to("cpu", torch.float64) @ B.detach().to("cpu", torch.float64).transpose(-1, -2)


# ---------------------------------------------------------------- spectral initialization


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("device", DEVICES)
def test_spectral_init_of_half_weights(device, dtype):
    W = _weight((96, 64), dtype, device)
    U, V = spectral_init(W, 16)
    assert U.dtype == V.dtype == dtype and U.device == V.device == W.device
    assert U.shape == (96, 16) and V.shape == (64, 16)
    assert rel_err(_prod64(U, V), _best_rank_r64(W, 16)) < EPS[dtype]
    # balanced factors: U^T U = V^T V = diag(s_1..s_r)
    s = torch.linalg.svdvals(W.detach().to("cpu", torch.float64))[:16]
    assert rel_err(torch.diagonal(_prod64(U.T, U.T)), s) < EPS[dtype]
    assert rel_err(torch.diagonal(_prod64(V.T, V.T)), s) < EPS[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_spectral_init_revives_dead_pairs_with_a_cpu_generator(device):
    """Rank 2 weight, rank 6 factors: 4 pairs have singular value 0 (``u_j = 0``, ``v_j`` random). A CPU
    generator seeds the draws on any device: the same seed gives the same factors as on the CPU."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(-3, 4, (40, 2), generator=g), torch.randint(-3, 4, (30, 2), generator=g)
    W = (a @ b.T).to(device=device, dtype=torch.float16)  # small integers: exactly rank 2 in float16
    U, V = spectral_init(W, 6, generator=torch.Generator().manual_seed(0))
    assert U.device == W.device and U.dtype == torch.float16
    assert rel_err(_prod64(U, V), W.double().cpu()) < EPS[torch.float16]
    assert float(U[:, 2:].abs().max()) == 0 and float(V[:, 2:].abs().min(0).values.max()) > 0
    U_cpu, V_cpu = spectral_init(W.cpu(), 6, generator=torch.Generator().manual_seed(0))
    assert rel_err(V[:, 2:].cpu(), V_cpu[:, 2:]) < EPS[torch.float16]  # same draws, rescaled alike


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("device", DEVICES)
def test_factorized_linear_from_half_linear(device, dtype):
    dense = nn.Linear(64, 96).to(device=device, dtype=dtype)
    layer = FactorizedLinear.from_linear(dense, rank_scale=0.25)
    assert layer.rank == 16
    for p in layer.parameters():
        assert p.dtype == dtype and p.device == dense.weight.device
    assert rel_err(layer.product(), _best_rank_r64(dense.weight, 16)) < EPS[dtype]
    assert torch.equal(layer.bias, dense.bias)
    x = _weight((5, 64), dtype, device, 3)
    y = layer(x)
    assert y.dtype == dtype and y.device == dense.weight.device
    want = x.double().cpu() @ _best_rank_r64(dense.weight, 16).T + dense.bias.double().cpu()
    assert rel_err(y, want) < 4 * EPS[dtype]  # factors, inputs and outputs each rounded to the dtype
    plain = layer.to_linear()
    assert plain.weight.dtype == dtype and plain.weight.device == dense.weight.device


def _attention_weights(dtype, device, d=64, H=4):
    q, k, v, o = (_weight((d, d), dtype, device, s) for s in range(4))
    qb, kb, vb, ob = (_weight((d,), dtype, device, s) for s in range(4, 8))
    return q, k, v, o, qb, kb, vb, ob


def _head_forms64(q, k, v, o, qb, H):
    """Per-head QK forms ``[W_q,h | b_q,h]^T W_k,h`` and OV forms ``W_o,h W_v,h`` in float64 (Eq. (1))."""
    q, k, v, o, qb = (t.detach().to("cpu", torch.float64) for t in (q, k, v, o, qb))
    d = q.shape[1]
    dq, dv = q.shape[0] // H, v.shape[0] // H
    Wq = torch.cat([q.view(H, dq, d), qb.view(H, dq, 1)], dim=2)  # H x dq x (d+1)
    qk = Wq.transpose(1, 2) @ k.view(H, dq, d)  # H x (d+1) x d
    ov = o.view(o.shape[0], H, dv).permute(1, 0, 2) @ v.view(H, dv, d)  # H x d x d
    return qk, ov


def _truncate64(forms: torch.Tensor, r: int) -> torch.Tensor:
    U, s, Vh = torch.linalg.svd(forms, full_matrices=False)
    return (U[..., :r] * s[..., None, :r]) @ Vh[..., :r, :]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("device", DEVICES)
def test_per_head_spectral_init_of_half_attention(device, dtype):
    H, r = 4, 8
    q, k, v, o, qb, kb, vb, ob = _attention_weights(dtype, device, H=H)
    new = attention_spectral_init(
        q, k, v, o, num_heads=H, qk_rank=r, ov_rank=r, q_bias=qb, k_bias=kb, v_bias=vb, o_bias=ob
    )
    for name, t in new.items():
        assert t.dtype == dtype and t.device == q.device, name
    assert new["q_weight"].shape == (H * r, 64) and new["o_weight"].shape == (64, H * r)
    qk, ov = _head_forms64(new["q_weight"], new["k_weight"], new["v_weight"], new["o_weight"], new["q_bias"], H)
    qk_ref, ov_ref = _head_forms64(q, k, v, o, qb, H)
    assert rel_err(qk, _truncate64(qk_ref, r)) < EPS[dtype]
    assert rel_err(ov, _truncate64(ov_ref, r)) < EPS[dtype]
    folded = ob.double().cpu() + o.double().cpu() @ vb.double().cpu()  # b_o + W_o b_v
    assert rel_err(new["o_bias"], folded) < EPS[dtype]

    # the batched primitive directly: head_spectral_init(A, B, r) = per-head best rank-r of A_h B_h^T
    A, B = _weight((H, 48, 16), dtype, device, 8), _weight((H, 40, 16), dtype, device, 9)
    A2, B2 = head_spectral_init(A, B, 6)
    assert A2.dtype == B2.dtype == dtype and A2.device == A.device
    assert rel_err(_prod64(A2, B2), _truncate64(_prod64(A, B), 6)) < EPS[dtype]


# ---------------------------------------------------------------- Frobenius decay


class _Block(nn.Module):
    """A factorized FFN (Gram route), an overcomplete deep factorized layer (product route) and an attention
    layer whose QK and OV forms are registered."""

    def __init__(self, d=32, H=4):
        super().__init__()
        self.ffn = FactorizedLinear(d, 2 * d, rank=8)
        self.deep = FactorizedLinear(8, 12, rank=16, deep=True)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        register_attention_forms(self, attention_form_specs("q.weight", "k.weight", "v.weight", "o.weight", H))


COEFFS = {"linear": 0.3, "qk": 0.2, "ov": 0.1}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("device", DEVICES)
def test_fd_and_backward_of_half_factors(device, dtype):
    torch.manual_seed(0)
    block = _Block()
    with torch.no_grad():
        block.deep.M.add_(0.1 * torch.randn_like(block.deep.M))
    block = block.to(device=device, dtype=dtype)
    ref_values, ref_grads = dense_fd64(block, COEFFS)

    fd = frobenius_penalty(block, **COEFFS)
    assert fd.dtype == torch.float32 and fd.device == block.q.weight.device
    assert float(fd.detach()) == pytest.approx(sum(ref_values.values()), rel=1e-5)
    fd.backward()
    grads = {n: p.grad for n, p in block.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g.dtype == dtype and g.device == block.q.weight.device
        assert rel_err(g, ref_grads[name]) < EPS[dtype], name

    decoupled = fd_grads(block, **COEFFS)  # what FLAMBe / AdamWFD apply: float32 on the device
    assert decoupled.keys() == ref_grads.keys()
    for name, g in decoupled.items():
        assert g.dtype == torch.float32 and g.device == block.q.weight.device
        assert rel_err(g, ref_grads[name]) < 1e-5, name


# ---------------------------------------------------------------- HuggingFace Trainer


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("setup", ["coupled", "flambe"])
@pytest.mark.parametrize("device", DEVICES)
def test_fnl_trainer_mixed_precision_stays_near_float32(tmp_path, device, setup, precision):
    pytest.importorskip("transformers")
    from precision_helpers import AUTOCAST_DTYPE, N_STEPS, SETUPS, after_n_tolerance, mp_trainer, param_distance

    from hf_trainer_helpers import params, quiet

    quiet()
    if device == "cpu" and precision == "fp16":
        pytest.skip("accelerate runs fp16=True as float32 on a CPU; test_hf_mixed_precision.py forces the fp16 path")
    if device == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16 support")
    coef = SETUPS[setup][1]
    ref = mp_trainer(str(tmp_path / "fp32"), "fp32", setup, coef, N_STEPS, device=device, logging_steps=N_STEPS)
    start = params(ref.model)
    ref.train()
    run = mp_trainer(str(tmp_path / precision), precision, setup, coef, N_STEPS, device=device, logging_steps=N_STEPS)
    run.train()
    assert run.model.bert.embeddings.word_embeddings.weight.device.type == device
    assert run.probe.dtypes == {AUTOCAST_DTYPE[precision]}
    tol = after_n_tolerance(precision, setup)
    got = param_distance(params(run.model), params(ref.model), start)
    assert got < tol, f"{device} {precision} {setup}: {got:.4f} from float32 (tolerance {tol})"
    if precision == "fp16":
        assert run.accelerator.scaler is not None  # the real GradScaler path
    no_fd = mp_trainer(str(tmp_path / "nofd"), "fp32", setup, 0.0, N_STEPS, device=device, logging_steps=N_STEPS)
    no_fd.train()
    assert param_distance(params(no_fd.model), params(ref.model), start) > 2.5 * tol


# ---------------------------------------------------------------- fairseq

FAIRSEQ_FD = [
    "--rank-scale",
    "0.5",
    "--spectral-init",
    "--criterion",
    "fd_label_smoothed_cross_entropy",
    "--fd-linear",
    "1e-2",
    "--fd-qk",
    "1e-2",
    "--fd-ov",
    "1e-2",
]
FAIRSEQ_PRECISIONS = {
    "fp32": [],
    # fairseq's adam, no weight decay: fairseq's flat fp32 buffer needs CUDA, so on the CPU per-parameter copies
    "fp16": ["--fp16", "--fp16-no-flatten-grads"],
    "fp16-fnl_adam-wd": ["--fp16", "--optimizer", "fnl_adam", "--weight-decay", "0.01"],  # per-parameter copies
    "bf16-flambe": ["--bf16", "--optimizer", "flambe", "--weight-decay", "0.01", "--fd-mode", "decoupled"],
}


# on the CPU only the fp16 case (the others are covered by test_fairseq_*.py): it checks this test's own logic
FAIRSEQ_CASES = [("cpu", "fp16")] + [pytest.param("cuda", p, marks=pytest.mark.gpu) for p in FAIRSEQ_PRECISIONS]


@pytest.mark.slow
@pytest.mark.parametrize("device,precision", FAIRSEQ_CASES)
def test_fairseq_training_then_recompose_on_cpu(tmp_path, device, precision):
    pytest.importorskip("fairseq")
    from fairseq_helpers import hypotheses, make_tiny_data, run_fairseq_cli, run_fairseq_train, tiny_train_args

    data = make_tiny_data(tmp_path / "data")
    save = str(tmp_path / "ck")
    argv = tiny_train_args(data, save, *FAIRSEQ_FD, *FAIRSEQ_PRECISIONS[precision], updates=4)
    if device == "cuda":
        argv.remove("--cpu")
        if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            pytest.skip("this GPU has no bfloat16")
    run = run_fairseq_train(argv, in_process=False)
    train = run.train
    assert len(train) == 4
    for rec in train:
        assert float(rec["loss"]) == float(rec["loss"]) and float(rec["loss"]) < 100  # finite
        if "--fd-mode" not in FAIRSEQ_PRECISIONS[precision]:  # coupled FD is logged
            assert float(rec["fd_qk"]) > 0 and float(rec["fd_linear"]) > 0
        if precision.startswith("fp16"):
            assert "loss_scale" in rec
    ckpt = os.path.join(save, "checkpoint_last.pt")

    # recompose on the CPU (the GPU hidden), then stock fairseq-generate without the plugin, on the CPU
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    stock = str(tmp_path / "stock.pt")
    res = subprocess.run(
        [sys.executable, "-m", "fnl_transformers.cli", "recompose", ckpt, stock],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    state = torch.load(stock, map_location="cpu", weights_only=True)
    assert state["cfg"]["model"]["arch"] == "transformer"
    assert all(t.device.type == "cpu" for t in state["model"].values())
    gen = [data, "--beam", "2", "--cpu", "--gen-subset", "test", "--batch-size", "8"]
    from fairseq_helpers import user_dir

    ref = hypotheses(run_fairseq_cli("generate", gen + ["--path", ckpt, "--user-dir", user_dir()], env=env).stdout)
    got = hypotheses(run_fairseq_cli("generate", gen + ["--path", stock], env=env).stdout)
    assert len(ref) == 8 and got.keys() == ref.keys()
    for src in ref:
        assert got[src][0] == ref[src][0], src
        assert abs(got[src][1] - ref[src][1]) <= 1e-3  # a float16 checkpoint is multiplied out in float32


# ---------------------------------------------------------------- fairseq mixed precision (checks and tolerances:
# fairseq_precision_helpers; the CPU cases are test_fairseq_mixed_precision.py)


@pytest.fixture(scope="module")
def fairseq_data(tmp_path_factory):
    pytest.importorskip("fairseq")
    from fairseq_helpers import make_tiny_data

    return make_tiny_data(tmp_path_factory.mktemp("fairseq_mp_gpu"))


def _fairseq_precision(mode=None):
    import fairseq_precision_helpers as fp

    if mode is not None and "bf16" in mode and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    return fp


FAIRSEQ_MATRIX = [
    (m, s)
    for m in ("fp16", "bf16", "memory-efficient-fp16", "memory-efficient-bf16", "amp")
    for s in ("fnl_adam", "flambe")
]


@pytest.mark.gpu
@pytest.mark.parametrize("mode,setup", FAIRSEQ_MATRIX)
def test_fairseq_first_update_in_every_precision_on_cuda(fairseq_data, mode, setup):
    _fairseq_precision(mode).check_first_update(fairseq_data, mode, setup, device="cuda")


@pytest.mark.gpu
def test_fairseq_fd_is_float32_under_cuda_autocast(fairseq_data):
    _fairseq_precision().check_fd_is_float32_under_autocast(fairseq_data, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fp16", "memory-efficient-fp16", "amp"])
@pytest.mark.parametrize("setup", ["fnl_adam", "flambe"])
def test_fairseq_overflowing_update_is_skipped_on_cuda(fairseq_data, monkeypatch, mode, setup):
    _fairseq_precision(mode).check_overflow_skipped(fairseq_data, mode, setup, monkeypatch, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("setup", ["fnl_adam", "flambe"])
def test_fairseq_50_bf16_updates_on_cuda(fairseq_data, setup):
    _fairseq_precision("bf16").check_50_updates(fairseq_data, setup, device="cuda")
