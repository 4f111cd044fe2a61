"""fairseq mixed precision with Frobenius decay, on the CPU: ``--fp16``, ``--bf16``, ``--memory-efficient-fp16``,
``--memory-efficient-bf16`` and ``--amp``, each with coupled FD (``fnl_adam`` or ``fnl_lamb`` with
``--weight-decay``, the criterion ``fd_label_smoothed_cross_entropy``) and decoupled FD (``flambe`` with
``--weight-decay``, ``--fd-mode decoupled``).

Every cell runs here. ``--fp16`` and the memory-efficient modes run as fairseq runs them on a GPU (half-precision
model, dynamic loss scaler). ``--bf16`` runs because the plugin clears the TPU flag fairseq's command line adds to it
when torch_xla is missing (:mod:`fnl_transformers.fairseq_plugin.precision`). ``--amp`` on a CPU has neither
autocast nor a working scaler in fairseq (both are CUDA's), so the in-process checks give the trainer's optimizer a
CPU ``torch.amp.GradScaler``: the scaled, unscaled and skipped steps run through fairseq's ``AMPOptimizer`` and the
plugin's step, with float32 weights. The fairseq trainer is built in process exactly as ``fairseq-train`` builds it
(parser, config, task, model, criterion, ``Trainer``; the plugin's bf16 step applied as its ``call_main`` does).

Checks, with tolerances in units of the half dtype's machine epsilon ``EPS`` (fp16 2^-10, bf16 2^-7; float32
cells 1e-6) and the measured values in brackets:

* the run starts (``fairseq-train`` in process, 2 updates, every cell; marked slow, end to end): no refusal, FD
  logged, the plugin's log line;
* the optimizer's parameter groups (names, weight decay, FD coefficients, FD forms) equal the float32 run's: with
  ``--fp16`` fairseq's master copies are per parameter, not one flat buffer;
* first update, coupled FD: the penalty the criterion adds (float32, from the half factors) within ``EPS / 4`` of
  the float32 run's [fp16 0.07 EPS, bf16 0.02 EPS], its gradient per parameter within ``EPS`` [0.4 EPS]; the logged
  ``fd_<kind>`` equal that penalty (unscaled; 2e-6 absolute, they are logged to 6 decimals); and the FD part of the
  gradient the optimizer receives (the same update with FD minus without it: after fairseq's loss scaling and
  unscaling; with ``fnl_adam``, the scaling is the wrapper's) within ``2 EPS`` of the float32 FD gradient
  [0.6 EPS]: FD is scaled exactly as the cross entropy;
* first update, decoupled FD: the FD term ``flambe`` applies, per parameter, within ``EPS`` of the float32 run's
  [0.35 EPS]; under ``FP16Optimizer`` it is computed on the float32 master copies, which fairseq copies back into
  the half-precision parameters; with the memory-efficient wrapper on the half-precision parameters themselves;
* overflow (the modes with a loss scaler: ``--fp16``, ``--memory-efficient-fp16``, ``--amp``): an update whose
  gradients overflow leaves the weights, the master copies and the optimizer state untouched, applies no decoupled
  FD, and halves the loss scale; under ``--amp`` fairseq retries the batch, and the result equals the run that
  never overflowed (1e-6);
* 50 updates on the tiny corpus in ``--bf16`` end within a relative distance of the float32 run (distance between
  the runs' parameters over the distance the float32 run travelled): ``fnl_adam`` 0.06 [0.021], ``flambe`` 0.15
  [0.071]; the float32 run without FD ends at least 2.5 tolerances away [1.10, 0.49], so the check sees FD.
"""
import copy
import logging

import pytest
import torch
from precision_helpers import param_distance, rel_err

import fairseq_helpers as fh

pytest.importorskip("fairseq")

from fairseq import options, tasks, utils  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq.optim.amp_optimizer import AMPOptimizer  # noqa: E402
from fairseq.optim.fp16_optimizer import FP16Optimizer, MemoryEfficientFP16Optimizer  # noqa: E402
from fairseq.trainer import Trainer  # noqa: E402

import fnl_transformers.fairseq_plugin.criterion as fd_criterion  # noqa: E402
import fnl_transformers.optim._fd as optim_fd  # noqa: E402
from fnl_transformers.fairseq_plugin import precision  # noqa: E402

MODES = {  # flag, wrapper, dtype of the model's parameters
    "fp16": (["--fp16"], FP16Optimizer, torch.float16),
    "bf16": (["--bf16"], FP16Optimizer, torch.bfloat16),
    "memory-efficient-fp16": (["--memory-efficient-fp16"], MemoryEfficientFP16Optimizer, torch.float16),
    "memory-efficient-bf16": (["--memory-efficient-bf16"], MemoryEfficientFP16Optimizer, torch.bfloat16),
    "amp": (["--amp"], AMPOptimizer, torch.float32),
}
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 1e-6}
FD_KINDS = ("linear", "qk", "ov")  # set on the command line; "embedding" follows "linear"
COUPLED = ["--criterion", "fd_label_smoothed_cross_entropy"]
SETUPS = {  # optimizer flags (with --weight-decay), coupled?
    "fnl_adam": (["--optimizer", "fnl_adam", "--weight-decay", "0.01", *COUPLED], True),
    "fnl_lamb": (["--optimizer", "fnl_lamb", "--weight-decay", "0.01", *COUPLED], True),
    "flambe": (["--optimizer", "flambe", "--weight-decay", "0.01", "--fd-mode", "decoupled"], False),
}
LAMBDA = 0.1  # FD coefficient of every kind in the first-update checks: the FD gradient is ~ the cross entropy's
MATRIX = [(mode, setup) for mode in MODES for setup in ("fnl_adam", "flambe")]
# 50 updates in --bf16: (FD coefficient, tolerance of param_distance to the float32 run)
AFTER_50 = {"fnl_adam": (0.1, 0.06), "flambe": (1.0, 0.15)}


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    return fh.make_tiny_data(tmp_path_factory.mktemp("fairseq_mp_data"))


def _argv(data_bin, setup, mode, lam):
    fd = [a for kind in FD_KINDS for a in (f"--fd-{kind}", str(lam))]
    argv = fh.tiny_train_args(data_bin, "unused", "--rank-scale", "0.5", *fd, *SETUPS[setup][0],
                              *(MODES[mode][0] if mode != "fp32" else []))
    for flag, stock in (("--optimizer", "adam"), ("--criterion", "label_smoothed_cross_entropy")):
        i = argv.index(flag)
        if argv[i + 1] == stock and argv.count(flag) > 1:
            del argv[i:i + 2]  # the helper's defaults give way to the setup's
    return argv


def build_trainer(data_bin, setup, mode, lam=LAMBDA):
    """A fairseq ``Trainer`` as ``fairseq-train`` builds it, its task with the train split loaded, and the first
    four batches of 16 sentences."""
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=_argv(data_bin, setup, mode, lam))
    cfg = convert_namespace_to_omegaconf(args)
    precision.resolve_bf16(cfg)  # what the plugin's call_main does before fairseq-train's main
    utils.set_torch_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    trainer = Trainer(cfg, task, task.build_model(cfg.model), task.build_criterion(cfg.criterion))
    if mode == "amp":  # fairseq's GradScaler is CUDA's (disabled here): the same steps with the CPU's
        trainer.optimizer._grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**7)
    task.load_dataset("train")
    ds = task.dataset("train")
    batches = [ds.collater([ds[i] for i in range(16 * k, 16 * k + 16)]) for k in range(4)]
    return trainer, batches


def _names(trainer):
    """``{id(tensor): parameter name}`` for the model's parameters and fairseq's master copies of them."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    opt = trainer.optimizer
    if isinstance(getattr(opt, "fp32_params", None), list):
        for p, p32 in zip(opt.fp16_params, opt.fp32_params):
            names[id(p32)] = names[id(p)]
    return names


def _groups(trainer):
    names = _names(trainer)
    return sorted((sorted(names[id(p)] for p in g["params"]), g["weight_decay"], g.get("fd", {}),
                   len(g.get("fd_forms", ()))) for g in trainer.optimizer.optimizer.param_groups)


def first_update(data_bin, setup, mode, lam=LAMBDA):
    """One training update of the first batch; returns what it saw: the FD penalty and its gradient (coupled), the
    FD term of the optimizer (decoupled), the gradients the optimizer received, the logging output."""
    trainer, batches = build_trainer(data_bin, setup, mode, lam)
    names = _names(trainer)
    rec = {"grads": {}}
    torch_opt = trainer.optimizer.optimizer
    step = torch_opt.step

    def recording_step(*args, **kwargs):
        rec["grads"] = {names[id(p)]: p.grad.detach().double().clone()
                        for g in torch_opt.param_groups for p in g["params"] if p.grad is not None}
        return step(*args, **kwargs)

    penalty = fd_criterion.frobenius_penalty_by_kind

    def spy_penalty(model, **coeffs):
        out = penalty(model, **coeffs)
        if out and "fd" not in rec:
            ps = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(torch.stack(list(out.values())).sum(), ps, retain_graph=True,
                                        allow_unused=True)
            rec["fd"] = {k: float(v.detach()) for k, v in out.items()}
            rec["fd_grad"] = {names[id(p)]: g.double() for p, g in zip(ps, grads) if g is not None}
        return out

    accumulate = optim_fd.accumulate_fd_grads

    def spy_accumulate(specs, lookup, coeffs, out=None):
        specs = list(specs)
        if "fd_term" not in rec:
            rec["fd_term"] = {names[i]: g.double() for i, g in accumulate(specs, lookup, coeffs).items()}
            rec["fd_term_params"] = [lookup(k) for s in specs for k in s.keys()]
        return accumulate(specs, lookup, coeffs, out)

    torch_opt.step = recording_step
    fd_criterion.frobenius_penalty_by_kind = spy_penalty
    optim_fd.accumulate_fd_grads = spy_accumulate
    try:
        rec["log"] = trainer.train_step([batches[0]])
    finally:
        torch_opt.step = step
        fd_criterion.frobenius_penalty_by_kind = penalty
        optim_fd.accumulate_fd_grads = accumulate
    rec["trainer"] = trainer
    return rec


_CACHE = {}


def cached_first_update(data_bin, setup, mode, lam=LAMBDA):
    key = (setup, mode, lam)
    if key not in _CACHE:
        _CACHE[key] = first_update(data_bin, setup, mode, lam)
    return _CACHE[key]


def _cat(d, keys):
    return torch.cat([d[k].flatten() for k in sorted(keys)])


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


# ------------------------------------------------------------------------------------------- the run starts
@pytest.mark.slow
@pytest.mark.parametrize("mode,setup", MATRIX)
def test_fairseq_train_starts_in_every_precision(data_bin, tmp_path, mode, setup):
    argv = _argv(data_bin, setup, mode, LAMBDA)
    argv[argv.index("--save-dir") + 1] = str(tmp_path)
    logging.disable(logging.NOTSET)
    run = fh.run_fairseq_train(argv + ["--max-update", "2", "--no-save", "--disable-validation"])
    assert len(run.train) == 2
    for rec in run.train:
        assert float(rec["loss"]) < 100
        if SETUPS[setup][1]:
            assert {f"fd_{k}" for k in FD_KINDS} <= rec.keys()
    if mode == "fp16":
        assert f"fnl: --optimizer {setup} keeps a decay per parameter" in run.output
    if mode.endswith("bf16"):
        assert "fnl: --bf16 without torch_xla: training in bfloat16 on the CPU" in run.output


# ------------------------------------------------------------------------------------------- first update
@pytest.mark.parametrize("mode,setup", MATRIX + [(mode, "fnl_lamb") for mode in MODES])
def test_first_update_groups_and_fd_equal_float32(data_bin, mode, setup):
    _, wrapper, dtype = MODES[mode]
    eps = EPS[dtype]
    ref, got = cached_first_update(data_bin, setup, "fp32"), cached_first_update(data_bin, setup, mode)
    trainer = got["trainer"]
    assert type(trainer.optimizer) is wrapper
    assert {p.dtype for p in trainer.model.parameters()} == {dtype}
    assert _groups(trainer) == _groups(ref["trainer"])  # the decay policy's groups and forms survive
    if wrapper is FP16Optimizer:
        assert not trainer.optimizer.has_flat_params  # bf16 never flattens; fp16 makes per-parameter copies:
        assert trainer.cfg.common.fp16_no_flatten_grads == (mode == "fp16")
        for p, p32 in zip(trainer.optimizer.fp16_params, trainer.optimizer.fp32_params):
            assert p32.dtype == torch.float32 and torch.equal(p.data, p32.data.to(p.dtype))  # copied back

    if SETUPS[setup][1]:  # coupled: the penalty in the loss, its gradient, how it was scaled, what was logged
        assert got["fd"].keys() == ref["fd"].keys() == {*FD_KINDS, "embedding"}
        for kind, value in got["fd"].items():
            assert value == pytest.approx(ref["fd"][kind], rel=eps / 4)
            assert float(got["log"][f"fd_{kind}"]) == pytest.approx(value, abs=2e-6)  # logged unscaled
        assert got["fd_grad"].keys() == ref["fd_grad"].keys()
        for name, grad in got["fd_grad"].items():
            assert rel_err(grad, ref["fd_grad"][name]) < eps, name
        if setup != "fnl_adam":
            return  # how the gradient is scaled is the wrapper's business, the same for every optimizer
        without = cached_first_update(data_bin, setup, mode, lam=0.0)
        assert "fd" not in without
        keys = ref["fd_grad"].keys()
        seen = {n: got["grads"][n] - without["grads"][n] for n in keys}  # the FD part of the optimizer's gradient
        assert rel_err(_cat(seen, keys), _cat(ref["fd_grad"], keys)) < 2 * eps
    else:  # decoupled: the FD term of the optimizer, on the master copies under FP16Optimizer
        assert "fd" not in got and got["fd_term"].keys() == ref["fd_term"].keys()
        for name, term in got["fd_term"].items():
            assert rel_err(term, ref["fd_term"][name]) < eps, name
        params = got["fd_term_params"]
        if wrapper is FP16Optimizer:
            masters = {id(p) for p in trainer.optimizer.fp32_params}
            assert all(id(p) in masters and p.dtype == torch.float32 for p in params)
        else:
            model_params = {id(p) for p in trainer.model.parameters()}
            assert all(id(p) in model_params and p.dtype == dtype for p in params)


def test_fd_is_float32_under_autocast(data_bin):
    """fairseq runs the criterion under autocast with --amp (CUDA's): the penalty is computed with autocast off.
    Here under the CPU's bf16 autocast, the criterion's penalty equals the one without autocast (1e-6)."""
    trainer, batches = build_trainer(data_bin, "fnl_adam", "fp32")
    model, criterion = trainer.model, trainer.criterion
    model.train()
    sample = batches[0]
    _, _, plain = criterion(model, sample)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, autocast = criterion(model, sample)
    for kind in (*FD_KINDS, "embedding"):
        assert float(autocast[f"fd_{kind}"]) == pytest.approx(float(plain[f"fd_{kind}"]), rel=1e-6)


# ------------------------------------------------------------------------------------------- overflow
def _state(trainer):
    opt = trainer.optimizer
    tensors = {f"param:{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    if isinstance(getattr(opt, "fp32_params", None), list):
        names = _names(trainer)
        tensors.update({f"master:{names[id(p)]}": p.detach().clone() for p in opt.fp32_params})
    state = copy.deepcopy(opt.optimizer.state_dict()["state"])
    return tensors, state


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def _loss_scale(trainer):
    return trainer.optimizer.scaler.get_scale() if isinstance(trainer.optimizer, AMPOptimizer) else \
        trainer.optimizer.scaler.loss_scale


@pytest.mark.parametrize("mode", ["fp16", "memory-efficient-fp16", "amp"])
@pytest.mark.parametrize("setup", ["fnl_adam", "flambe"])
def test_an_overflowing_update_is_skipped_with_its_fd(data_bin, monkeypatch, mode, setup):
    trainer, batches = build_trainer(data_bin, setup, mode)
    trainer.train_step([batches[0]])  # a normal update: moments and master copies exist
    before, scale = _state(trainer), _loss_scale(trainer)

    fd_calls = []
    accumulate = optim_fd.accumulate_fd_grads
    monkeypatch.setattr(optim_fd, "accumulate_fd_grads", lambda *a, **k: fd_calls.append(1) or accumulate(*a, **k))
    # fairseq's OverflowError handler makes a CUDA tensor (grad_norm = torch.tensor(0.0).cuda()): on the CPU, keep it
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    factor = dict(trainer.model.named_parameters())["encoder.layers.0.fc1.U"]
    fired = []

    def overflow_once(grad):
        if fired:
            return grad
        fired.append(1)
        return torch.full_like(grad, float("inf"))

    handle = factor.register_hook(overflow_once)
    log = trainer.train_step([batches[1]])
    handle.remove()
    assert fired
    assert _loss_scale(trainer) == scale / 2
    if mode != "amp":  # skipped: nothing moved, no FD, no update counted
        assert log is None and trainer.get_num_updates() == 1 and not fd_calls
        after = _state(trainer)
        assert _same(after[0], before[0]) and _same(after[1], before[1])
        return
    # --amp: fairseq retries the batch at the lower scale; the skipped attempt left no trace
    assert log is not None and trainer.get_num_updates() == 2
    assert len(fd_calls) == (0 if SETUPS[setup][1] else 1)  # decoupled FD applied once
    reference, ref_batches = build_trainer(data_bin, setup, mode)
    for b in ref_batches[:2]:
        reference.train_step([b])
    got, want = _state(trainer), _state(reference)
    for name, tensor in want[0].items():
        assert rel_err(got[0][name], tensor) < 1e-6, name
    for key, state in want[1].items():
        assert got[1][key]["step"] == state["step"]
        assert rel_err(got[1][key]["exp_avg"], state["exp_avg"]) < 1e-6


# ------------------------------------------------------------------------------------------- 50 updates
def _train(data_bin, setup, mode, lam, updates=50):
    trainer, batches = build_trainer(data_bin, setup, mode, lam)
    start = {n: p.detach().double().clone() for n, p in trainer.model.named_parameters()}
    for i in range(updates):
        trainer.train_step([batches[i % len(batches)]])
    return start, {n: p.detach().double().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("setup", list(AFTER_50))
def test_50_bf16_updates_stay_close_to_float32(data_bin, setup):
    lam, tol = AFTER_50[setup]
    start, fp32 = _train(data_bin, setup, "fp32", lam)
    _, bf16 = _train(data_bin, setup, "bf16", lam)
    _, no_fd = _train(data_bin, setup, "fp32", 0.0)
    assert param_distance(bf16, fp32, start) < tol
    assert param_distance(no_fd, fp32, start) > 2.5 * tol  # FD moves the weights further than bf16 rounding
