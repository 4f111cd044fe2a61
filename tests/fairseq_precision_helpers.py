"""The fairseq mixed-precision checks, on a device: shared by ``test_fairseq_mixed_precision.py`` (CPU) and
``test_gpu.py`` (CUDA, ``gpu`` marker).

Precisions: ``--fp16``, ``--bf16``, ``--memory-efficient-fp16``, ``--memory-efficient-bf16``, ``--amp``; setups:
coupled FD (``fnl_adam`` or ``fnl_lamb`` with ``--weight-decay``, the criterion ``fd_label_smoothed_cross_entropy``)
and decoupled FD (``flambe`` with ``--weight-decay``, ``--fd-mode decoupled``). The fairseq trainer is built in
process exactly as ``fairseq-train`` builds it (parser, config, task, model, criterion, ``Trainer``; the plugin's
bf16 step applied as its ``call_main`` does). On a CPU, ``--amp`` has neither autocast nor a working scaler in
fairseq (both are CUDA's): the CPU checks give the trainer's optimizer a CPU ``torch.amp.GradScaler``, so the
scaled, unscaled and skipped steps run through fairseq's ``AMPOptimizer`` and the plugin's step, with float32
weights.

Checks, with tolerances in units of the machine epsilon ``EPS`` of the precision the model computes in (fp16
2^-10, bf16 2^-7; ``--amp``: 1e-6 on a CPU, fp16's on CUDA where autocast runs the forward in float16) and the
values measured on the CPU in brackets (``python tests/fairseq_precision_helpers.py [cuda]`` prints them):

* :func:`check_first_update`: the optimizer's parameter groups (names, weight decay, FD coefficients, FD forms)
  equal the float32 run's (with ``--fp16`` fairseq's master copies are per parameter, not one flat buffer). Coupled
  FD: the penalty the criterion adds (float32, from the half factors) within ``EPS / 4`` of the float32 run's
  [fp16 0.07 EPS, bf16 0.02 EPS], its gradient per parameter within ``EPS`` [0.41 EPS], the logged ``fd_<kind>``
  equal to that penalty (unscaled; 2e-6 absolute, they are logged to 6 decimals), and, with ``fnl_adam``, the FD
  part of the gradient the optimizer receives (the update with FD minus the same update without it: after
  fairseq's loss scaling and unscaling) within ``2 EPS`` of the float32 FD gradient [0.61 EPS]: FD is scaled
  exactly as the cross entropy (how gradients are scaled is the wrapper's, whatever the optimizer). Decoupled FD:
  the FD term ``flambe`` applies, per parameter, within ``EPS`` of the float32 run's [0.36 EPS]; under
  ``FP16Optimizer`` computed on the float32 master copies, which fairseq copies back into the half-precision
  parameters; under the memory-efficient wrapper on the half-precision parameters themselves.
* :func:`check_overflow_skipped` (the precisions with a loss scaler: ``--fp16``, ``--memory-efficient-fp16``,
  ``--amp``): an update whose gradients overflow leaves the weights, the master copies and the optimizer state
  untouched (exactly), applies no decoupled FD and halves the loss scale; under ``--amp`` fairseq retries the batch,
  and the result equals the run that never overflowed (``EPS``: 1e-6 on a CPU).
* :func:`check_50_updates`: 50 updates on the tiny corpus in ``--bf16`` end within a relative distance of the
  float32 run (the distance between the two runs' parameters over the distance the float32 run travelled):
  ``fnl_adam`` 0.06 [0.021], ``flambe`` 0.15 [0.071]; the float32 run without FD ends at least 2.5 tolerances
  away [1.10, 0.49], so the check sees FD.
"""

from __future__ import annotations

import copy
from typing import Dict, List

import torch
from fairseq import options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.optim.fp16_optimizer import FP16Optimizer, MemoryEfficientFP16Optimizer
from fairseq.trainer import Trainer
from precision_helpers import param_distance, rel_err

import fnl_transformers.fairseq_plugin.criterion as fd_criterion
import fnl_transformers.optim._fd as optim_fd
from fnl_transformers.fairseq_plugin import precision

import fairseq_helpers as fh

MODES = {  # flags, wrapper, dtype of the model's parameters
    "fp16": (["--fp16"], FP16Optimizer, torch.float16),
    "bf16": (["--bf16"], FP16Optimizer, torch.bfloat16),
    "memory-efficient-fp16": (["--memory-efficient-fp16"], MemoryEfficientFP16Optimizer, torch.float16),
    "memory-efficient-bf16": (["--memory-efficient-bf16"], MemoryEfficientFP16Optimizer, torch.bfloat16),
    "amp": (["--amp"], AMPOptimizer, torch.float32),
}
SCALED = ("fp16", "memory-efficient-fp16", "amp")  # the precisions with a loss scaler
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 1e-6}
FD_KINDS = ("linear", "qk", "ov")  # set on the command line; "embedding" follows "linear"
COUPLED = ["--criterion", "fd_label_smoothed_cross_entropy"]
SETUPS = {  # optimizer flags (with --weight-decay), coupled FD?
    "fnl_adam": (["--optimizer", "fnl_adam", "--weight-decay", "0.01", *COUPLED], True),
    "fnl_lamb": (["--optimizer", "fnl_lamb", "--weight-decay", "0.01", *COUPLED], True),
    "flambe": (["--optimizer", "flambe", "--weight-decay", "0.01", "--fd-mode", "decoupled"], False),
}
LAMBDA = 0.1  # FD coefficient of every kind in the first-update checks: the FD gradient is ~ the cross entropy's
MATRIX = [(mode, setup) for mode in MODES for setup in ("fnl_adam", "flambe")]
AFTER_50 = {"fnl_adam": (0.1, 0.06), "flambe": (1.0, 0.15)}  # --bf16: (FD coefficient, param_distance tolerance)


def train_argv(data_bin: str, save_dir: str, setup: str, mode: str, lam: float = LAMBDA, device: str = "cpu"):
    """``fairseq-train`` flags of a tiny low-rank model (rank scale 0.5) with FD ``lam`` on the linear, QK and OV
    forms, the optimizer of ``setup`` and the flags of precision ``mode`` (``fp32``: none)."""
    fd = [a for kind in FD_KINDS for a in (f"--fd-{kind}", str(lam))]
    argv = fh.tiny_train_args(
        data_bin, save_dir, "--rank-scale", "0.5", *fd, *SETUPS[setup][0], *(MODES[mode][0] if mode != "fp32" else [])
    )
    for flag, stock in (("--optimizer", "adam"), ("--criterion", "label_smoothed_cross_entropy")):
        i = argv.index(flag)
        if argv[i + 1] == stock and argv.count(flag) > 1:
            del argv[i : i + 2]  # the helper's defaults give way to the setup's
    return argv if device == "cpu" else [a for a in argv if a != "--cpu"]


def compute_eps(mode: str, device: str) -> float:
    dtype = MODES[mode][2]
    return EPS[torch.float16] if mode == "amp" and device != "cpu" else EPS[dtype]


def build_trainer(data_bin: str, setup: str, mode: str, lam: float = LAMBDA, device: str = "cpu"):
    """A fairseq ``Trainer`` as ``fairseq-train`` builds it and the first four batches of 16 sentences."""
    argv = train_argv(data_bin, "unused", setup, mode, lam, device)
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), input_args=argv))
    precision.resolve_bf16(cfg)  # what the plugin's call_main does before fairseq-train's main
    utils.set_torch_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    trainer = Trainer(cfg, task, task.build_model(cfg.model), task.build_criterion(cfg.criterion))
    if mode == "amp" and device == "cpu":  # fairseq's GradScaler is CUDA's (disabled here): the CPU's
        trainer.optimizer._grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**7)
    task.load_dataset("train")
    ds = task.dataset("train")
    batches = [ds.collater([ds[i] for i in range(16 * k, 16 * k + 16)]) for k in range(4)]
    return trainer, batches


def _names(trainer) -> Dict[int, str]:
    """``{id(tensor): parameter name}`` for the model's parameters and fairseq's master copies of them."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    opt = trainer.optimizer
    if isinstance(getattr(opt, "fp32_params", None), list):
        for p, p32 in zip(opt.fp16_params, opt.fp32_params):
            names[id(p32)] = names[id(p)]
    return names


def _groups(trainer) -> List[tuple]:
    names = _names(trainer)
    return sorted(
        (sorted(names[id(p)] for p in g["params"]), g["weight_decay"], g.get("fd", {}), len(g.get("fd_forms", ())))
        for g in trainer.optimizer.optimizer.param_groups
    )


def first_update(data_bin: str, setup: str, mode: str, lam: float = LAMBDA, device: str = "cpu") -> dict:
    """One training update of the first batch; what it saw: the FD penalty and its gradient (coupled), the FD term
    of the optimizer (decoupled), the gradients the optimizer received, the logging output, the trainer."""
    trainer, batches = build_trainer(data_bin, setup, mode, lam, device)
    names = _names(trainer)
    rec: dict = {"grads": {}}
    torch_opt = trainer.optimizer.optimizer
    step = torch_opt.step

    def recording_step(*args, **kwargs):
        rec["grads"] = {
            names[id(p)]: p.grad.detach().double().clone()
            for g in torch_opt.param_groups
            for p in g["params"]
            if p.grad is not None
        }
        return step(*args, **kwargs)

    penalty = fd_criterion.frobenius_penalty_by_kind

    def spy_penalty(model, **coeffs):
        out = penalty(model, **coeffs)
        if out and "fd" not in rec:
            ps = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(torch.stack(list(out.values())).sum(), ps, retain_graph=True, allow_unused=True)
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


_CACHE: Dict[tuple, dict] = {}


def cached_first_update(data_bin: str, setup: str, mode: str, lam: float = LAMBDA, device: str = "cpu") -> dict:
    key = (data_bin, setup, mode, lam, device)
    if key not in _CACHE:
        _CACHE[key] = first_update(data_bin, setup, mode, lam, device)
    return _CACHE[key]


def _cat(d, keys) -> torch.Tensor:
    return torch.cat([d[k].flatten().cpu() for k in sorted(keys)])


def first_update_errors(data_bin: str, mode: str, setup: str, device: str = "cpu") -> Dict[str, float]:
    """The first update of ``mode`` against float32, in units of ``compute_eps``: the largest relative error of the
    FD value per kind (``fd_value``), of the FD gradient per parameter (``fd_grad``), of the FD part of the gradient
    the optimizer received (``fd_seen``, ``fnl_adam`` only), or of the decoupled FD term per parameter
    (``fd_term``). Asserts what holds exactly: groups, wrapper, dtypes, master copies, logged values, the tensors
    decoupled FD reads."""
    _, wrapper, dtype = MODES[mode]
    eps = compute_eps(mode, device)
    ref, got = (
        cached_first_update(data_bin, setup, "fp32", device=device),
        cached_first_update(data_bin, setup, mode, device=device),
    )
    trainer = got["trainer"]
    assert type(trainer.optimizer) is wrapper
    assert {p.dtype for p in trainer.model.parameters()} == {dtype}
    assert _groups(trainer) == _groups(ref["trainer"])  # the decay policy's groups and forms survive
    if wrapper is FP16Optimizer:
        assert not trainer.optimizer.has_flat_params  # bf16 never flattens; fp16 makes per-parameter copies:
        assert trainer.cfg.common.fp16_no_flatten_grads == (mode == "fp16")
        for p, p32 in zip(trainer.optimizer.fp16_params, trainer.optimizer.fp32_params):
            assert p32.dtype == torch.float32 and torch.equal(p.data, p32.data.to(p.dtype))  # copied back
    errors = {}
    if SETUPS[setup][1]:  # coupled: the penalty in the loss, its gradient, what was logged, how it was scaled
        assert got["fd"].keys() == ref["fd"].keys() == {*FD_KINDS, "embedding"}
        for kind, value in got["fd"].items():
            assert abs(float(got["log"][f"fd_{kind}"]) - value) <= 2e-6, kind  # logged, unscaled
        errors["fd_value"] = max(abs(v - ref["fd"][k]) / abs(ref["fd"][k]) for k, v in got["fd"].items()) / eps
        assert got["fd_grad"].keys() == ref["fd_grad"].keys()
        errors["fd_grad"] = max(rel_err(g, ref["fd_grad"][n]) for n, g in got["fd_grad"].items()) / eps
        if setup == "fnl_adam":
            without = cached_first_update(data_bin, setup, mode, lam=0.0, device=device)
            assert "fd" not in without
            keys = ref["fd_grad"].keys()
            seen = {n: got["grads"][n] - without["grads"][n] for n in keys}  # the FD part of the optimizer's grad
            errors["fd_seen"] = rel_err(_cat(seen, keys), _cat(ref["fd_grad"], keys)) / eps
    else:  # decoupled: the FD term of the optimizer, on the master copies under FP16Optimizer
        assert "fd" not in got and got["fd_term"].keys() == ref["fd_term"].keys()
        errors["fd_term"] = max(rel_err(t, ref["fd_term"][n]) for n, t in got["fd_term"].items()) / eps
        params = got["fd_term_params"]
        if wrapper is FP16Optimizer:
            masters = {id(p) for p in trainer.optimizer.fp32_params}
            assert all(id(p) in masters and p.dtype == torch.float32 for p in params)
        else:
            model_params = {id(p) for p in trainer.model.parameters()}
            assert all(id(p) in model_params and p.dtype == dtype for p in params)
    return errors


FIRST_UPDATE_TOL = {"fd_value": 0.25, "fd_grad": 1.0, "fd_seen": 2.0, "fd_term": 1.0}  # in units of EPS


def check_first_update(data_bin: str, mode: str, setup: str, device: str = "cpu") -> None:
    errors = first_update_errors(data_bin, mode, setup, device)
    assert errors and all(errors[k] < FIRST_UPDATE_TOL[k] for k in errors), errors


def check_fd_is_float32_under_autocast(data_bin: str, device: str = "cpu") -> None:
    """fairseq runs the criterion under autocast with ``--amp``: the criterion computes the penalty with autocast
    off, so under (the device's) half-precision autocast it equals the penalty without autocast (1e-6)."""
    trainer, batches = build_trainer(data_bin, "fnl_adam", "fp32", device=device)
    model, criterion = trainer.model, trainer.criterion
    model.train()
    sample = utils.move_to_cuda(batches[0]) if device != "cpu" else batches[0]
    _, _, plain = criterion(model, sample)
    half = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=half):
        _, _, autocast = criterion(model, sample)
    for kind in (*FD_KINDS, "embedding"):
        want = float(plain[f"fd_{kind}"])
        assert abs(float(autocast[f"fd_{kind}"]) - want) <= 1e-6 * want, kind


def _state(trainer):
    opt = trainer.optimizer
    tensors = {f"param:{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    if isinstance(getattr(opt, "fp32_params", None), list):
        names = _names(trainer)
        tensors.update({f"master:{names[id(p)]}": p.detach().clone() for p in opt.fp32_params})
    return tensors, copy.deepcopy(opt.optimizer.state_dict()["state"])


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def _loss_scale(trainer) -> float:
    scaler = trainer.optimizer.scaler
    return scaler.get_scale() if isinstance(trainer.optimizer, AMPOptimizer) else scaler.loss_scale


def check_overflow_skipped(data_bin: str, mode: str, setup: str, monkeypatch, device: str = "cpu") -> None:
    trainer, batches = build_trainer(data_bin, setup, mode, device=device)
    trainer.train_step([batches[0]])  # a normal update: moments and master copies exist
    before, scale = _state(trainer), _loss_scale(trainer)

    fd_calls = []
    accumulate = optim_fd.accumulate_fd_grads
    monkeypatch.setattr(optim_fd, "accumulate_fd_grads", lambda *a, **k: fd_calls.append(1) or accumulate(*a, **k))
    if device == "cpu":  # fairseq's OverflowError handler makes a CUDA tensor (torch.tensor(0.0).cuda())
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
    reference, ref_batches = build_trainer(data_bin, setup, mode, device=device)
    for b in ref_batches[:2]:
        reference.train_step([b])
    got, want = _state(trainer), _state(reference)
    tol = compute_eps(mode, device)  # 1e-6 on a CPU (float32); CUDA autocast rounds gradients scaled 64 vs 128
    for name, tensor in want[0].items():
        assert rel_err(got[0][name], tensor) < tol, name
    for key, state in want[1].items():
        assert got[1][key]["step"] == state["step"]
        assert rel_err(got[1][key]["exp_avg"], state["exp_avg"]) < tol


def _train(data_bin: str, setup: str, mode: str, lam: float, device: str, updates: int = 50):
    trainer, batches = build_trainer(data_bin, setup, mode, lam, device)
    start = {n: p.detach().double().cpu() for n, p in trainer.model.named_parameters()}
    for i in range(updates):
        trainer.train_step([batches[i % len(batches)]])
    return start, {n: p.detach().double().cpu() for n, p in trainer.model.named_parameters()}


def distances_after_50(data_bin: str, setup: str, device: str = "cpu") -> Dict[str, float]:
    """``param_distance`` to the float32 run after 50 updates: of the ``--bf16`` run (``bf16``) and of the float32
    run without FD (``no_fd``)."""
    lam, _ = AFTER_50[setup]
    start, fp32 = _train(data_bin, setup, "fp32", lam, device)
    _, bf16 = _train(data_bin, setup, "bf16", lam, device)
    _, no_fd = _train(data_bin, setup, "fp32", 0.0, device)
    return {"bf16": param_distance(bf16, fp32, start), "no_fd": param_distance(no_fd, fp32, start)}


def check_50_updates(data_bin: str, setup: str, device: str = "cpu") -> None:
    tol = AFTER_50[setup][1]
    d = distances_after_50(data_bin, setup, device)
    assert d["bf16"] < tol, d
    assert d["no_fd"] > 2.5 * tol, d  # FD moves the weights further than bf16 rounding


def main() -> None:
    """Print the measured values quoted in the module docstring and the README (``python
    tests/fairseq_precision_helpers.py [cuda]``)."""
    import logging
    import sys
    import tempfile
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    data_bin = fh.make_tiny_data(tempfile.mkdtemp(prefix="fnl-mp-"))
    print(f"first update vs float32 ({device}), in units of EPS; tolerances {FIRST_UPDATE_TOL}")
    for mode, setup in MATRIX + [(m, "fnl_lamb") for m in MODES]:
        errors = first_update_errors(data_bin, mode, setup, device)
        print(f"  {mode:22s} {setup:9s} " + "  ".join(f"{k} {v:.3f}" for k, v in errors.items()))
    print("param_distance to float32 after 50 updates (tolerance, bf16 run, float32 run without FD)")
    for setup in AFTER_50:
        d = distances_after_50(data_bin, setup, device)
        print(f"  {setup:9s} {AFTER_50[setup][1]:.3g}  bf16 {d['bf16']:.3f}  no FD {d['no_fd']:.3f}")


if __name__ == "__main__":
    main()
