"""FNLTrainer under mixed precision on the CPU: ``TrainingArguments(bf16=True)`` (CPU autocast to bfloat16) and
the fp16 path (autocast to float16 plus a ``GradScaler``), with coupled FD (Trainer's AdamW), decoupled
``AdamWFD`` and ``FLAMBe``.

accelerate ignores ``fp16=True`` on a CPU (no autocast, no scaler: the run is float32). The fp16 tests switch
on the two attributes accelerate sets on CUDA (``native_amp`` and a ``torch.amp.GradScaler``), so the same
code path runs here: autocast to float16 around the forward, ``scaler.scale(loss).backward()``,
``scaler.step(optimizer)`` (unscale, skip on inf/NaN), ``scaler.update()``.

What is checked, with tolerances (measured values in brackets):

* First update: the FD value and the FD gradient the trainer uses (coupled: the penalty in the loss;
  decoupled: the FD term the optimizer applies) equal those of the float32 run (rel. 1e-6; bitwise equal
  here) and the float64 dense reference (rel. 1e-5): FD is computed in float32 from the factors, outside
  autocast. The same penalty computed *inside* bf16 autocast misses the reference by > 1e-4 [~3e-3], so
  the check would see autocast leaking into FD.
* First update with SGD and large FD (coupled): the whole update equals the float32 one within 2e-2 (bf16)
  [4e-3] / 5e-3 (fp16) [5e-4]; dropping FD (no weight decay in these runs) moves it by 0.16, so FD is scaled
  with the loss like the task loss.
* After 30 updates the parameters are within a stated distance of the float32 run, relative to how far
  the float32 run travelled (``param_distance``); Adam amplifies the rounding of near-zero gradients, LAMB's
  trust ratio does not: coupled/AdamWFD 0.2 (bf16) [0.07-0.09] and 0.05 (fp16) [0.005-0.014], FLAMBe 0.02
  (bf16) [0.005] and 0.005 (fp16) [4e-4]. Each run's FD coefficients are large enough that the same run
  without FD ends at least 2.5 tolerances away [0.58-0.89 Adam, 0.087 FLAMBe].
* fp16 overflow: a first update whose scaled gradients overflow is skipped whole (task loss and FD, coupled
  or decoupled: weights and optimizer state untouched), the logged loss and ``fnl/<kind>/fd`` are unscaled,
  and the following updates equal a float32 run that never saw the first batch.
"""

import pytest
import torch

pytest.importorskip("transformers")

from precision_helpers import (  # noqa: E402
    AUTOCAST_DTYPE,
    N_STEPS,
    SETUPS,
    after_n_tolerance,
    dense_fd64,
    fd_coeffs,
    mp_trainer,
    param_distance,
    rel_err,
)

import fnl_transformers.hf.trainer as hf_trainer  # noqa: E402
import fnl_transformers.optim._fd as optim_fd  # noqa: E402
from fnl_transformers.core import frobenius_penalty_by_kind  # noqa: E402

from hf_trainer_helpers import FD, MLMData, params, quiet, tiny_bert  # noqa: E402

quiet()

SAME = 1e-6  # mixed precision vs float32, same float32 weights (FD never sees autocast)
REF = 1e-5  # float32 Gram route vs float64 dense products
STEP1_SGD = {"bf16": 2e-2, "fp16": 5e-3}


def _force_cpu_fp16(trainer, init_scale: float, backoff: float = 0.5) -> torch.amp.GradScaler:
    """What accelerate does for fp16 on CUDA, on the CPU: autocast the forward to float16, scale the loss."""
    acc = trainer.accelerator
    assert acc.mixed_precision == "fp16" and acc.scaler is None  # accelerate's CPU choice: a float32 run
    acc.native_amp = True
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=backoff)
    return acc.scaler


def _trainer(tmp_path, name, precision, setup, coef, steps, data=None, init_scale=2.0**10, backoff=0.5, **kw):
    trainer = mp_trainer(str(tmp_path / name), precision, setup, coef, steps, data=data, **kw)
    if precision == "fp16":
        _force_cpu_fp16(trainer, init_scale, backoff)
    return trainer


def _record_first_fd(monkeypatch, setup):
    """Patch the FD entry point the trainer (coupled) or the optimizer (decoupled) calls; keep what the first
    training call computes: FD values per kind (coupled) and the FD gradient per parameter id."""
    rec = {}
    if setup == "coupled":
        original = hf_trainer.frobenius_penalty_by_kind

        def spy(model, **coeffs):
            out = original(model, **coeffs)
            if torch.is_grad_enabled() and out and "grads" not in rec:
                rec["autocast"] = torch.is_autocast_enabled("cpu")
                total = torch.stack(list(out.values())).sum()
                ps = [p for p in model.parameters() if p.requires_grad]
                grads = torch.autograd.grad(total, ps, retain_graph=True, allow_unused=True)
                rec["values"] = {k: float(v.detach()) for k, v in out.items()}
                rec["grads"] = {id(p): g.detach().clone() for p, g in zip(ps, grads) if g is not None}
            return out

        monkeypatch.setattr(hf_trainer, "frobenius_penalty_by_kind", spy)
    else:
        original = optim_fd.accumulate_fd_grads

        def spy(specs, lookup, coeffs, out=None):
            specs = list(specs)
            if "grads" not in rec:
                rec["autocast"] = torch.is_autocast_enabled("cpu")
                rec["grads"] = {i: g.clone() for i, g in original(specs, lookup, coeffs).items()}  # FD alone
            return original(specs, lookup, coeffs, out)

        monkeypatch.setattr(optim_fd, "accumulate_fd_grads", spy)
    return rec


def _by_name(model, grads_by_id):
    return {n: grads_by_id[id(p)] for n, p in model.named_parameters() if id(p) in grads_by_id}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_first_update_fd_value_and_gradient_equal_float32(tmp_path, monkeypatch, precision, setup):
    coef = SETUPS[setup][1]
    ref_values, ref_grads = dense_fd64(tiny_bert(), fd_coeffs(coef))
    runs = {}
    for prec in ("fp32", precision):
        with monkeypatch.context() as m:
            rec = _record_first_fd(m, setup)
            trainer = _trainer(tmp_path, prec, prec, setup, coef, steps=1)
            trainer.train()
        assert "grads" in rec, "the FD entry point was not called during training"
        assert rec["autocast"] is False  # FD never runs under autocast
        runs[prec] = (trainer, _by_name(trainer.model, rec["grads"]), rec.get("values"))
    trainer, grads, values = runs[precision]
    assert trainer.probe.dtypes == {AUTOCAST_DTYPE[precision]}  # the forward really ran under autocast
    assert runs["fp32"][0].probe.dtypes == {torch.float32}
    if precision == "fp16":
        assert not trainer.accelerator.optimizer_step_was_skipped

    fp32_grads, fp32_values = runs["fp32"][1], runs["fp32"][2]
    assert grads.keys() == fp32_grads.keys() == ref_grads.keys()
    for name in grads:
        assert rel_err(grads[name], fp32_grads[name]) < SAME, name
        assert rel_err(grads[name], ref_grads[name]) < REF, name
    if setup == "coupled":
        assert values.keys() == fp32_values.keys() == ref_values.keys() == set(FD)
        for kind in values:
            assert values[kind] == pytest.approx(fp32_values[kind], rel=SAME)
            assert values[kind] == pytest.approx(ref_values[kind], rel=REF)


def test_fd_inside_autocast_would_be_caught():
    """Sensitivity of the checks above: the penalty computed under bf16 autocast misses the float64 reference by
    far more than REF, so a trainer that let autocast reach FD would fail them."""
    model = tiny_bert()
    ref, _ = dense_fd64(model, FD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        leaky = {k: float(v.detach()) for k, v in frobenius_penalty_by_kind(model, **FD).items()}
    assert max(abs(leaky[k] - ref[k]) / ref[k] for k in ref) > 10 * REF
    exact = {k: float(v.detach()) for k, v in frobenius_penalty_by_kind(model, **FD).items()}
    assert max(abs(exact[k] - ref[k]) / ref[k] for k in ref) < REF


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_first_sgd_update_with_coupled_fd_equals_float32(tmp_path, precision):
    """SGD makes the update linear in the gradient: FD scaled differently from the task loss (e.g. left out of
    the loss scaling) would show at full size. No weight decay, so that the run without FD differs by FD alone
    (factors without FD take weight decay by default)."""
    kw = dict(optim="sgd", learning_rate=0.5, weight_decay=0.0)
    ref = _trainer(tmp_path, "fp32", "fp32", "coupled", 0.5, steps=1, **kw)
    start = params(ref.model)
    ref.train()
    run = _trainer(tmp_path, precision, precision, "coupled", 0.5, steps=1, **kw)
    run.train()
    no_fd = _trainer(tmp_path, "nofd", "fp32", "coupled", 0.0, steps=1, **kw)
    no_fd.train()
    assert param_distance(params(run.model), params(ref.model), start) < STEP1_SGD[precision]
    assert param_distance(params(no_fd.model), params(ref.model), start) > 4 * STEP1_SGD["bf16"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_after_n_updates_parameters_stay_near_float32(tmp_path, tmp_path_factory, precision, setup):
    coef = SETUPS[setup][1]
    tol = after_n_tolerance(precision, setup)
    start, ref = _float32_run(tmp_path_factory, setup, coef)
    run = _trainer(tmp_path, precision, precision, setup, coef, steps=N_STEPS, logging_steps=N_STEPS)
    run.train()
    assert run.probe.dtypes == {AUTOCAST_DTYPE[precision]}
    got = param_distance(params(run.model), ref, start)
    assert got < tol, f"{precision} {setup}: {got:.4f} from float32 (tolerance {tol})"
    _, no_fd = _float32_run(tmp_path_factory, setup, 0.0)
    assert param_distance(no_fd, ref, start) > 2.5 * tol  # FD matters at this tolerance


_FLOAT32_RUNS = {}


def _float32_run(tmp_path_factory, setup, coef):
    """(start, end) weights of the float32 run of ``N_STEPS`` updates (computed once per setup and coefficient)."""
    key = (setup, coef)
    if key not in _FLOAT32_RUNS:
        run = _trainer(
            tmp_path_factory.mktemp("fp32"), "run", "fp32", setup, coef, steps=N_STEPS, logging_steps=N_STEPS
        )
        start = params(run.model)
        run.train()
        _FLOAT32_RUNS[key] = (start, params(run.model))
    return _FLOAT32_RUNS[key]


class _Snapshot:
    """Trainer callback: the weights right after the first update."""

    def __init__(self, model):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 1:
                    outer.after_first = params(model)

        self.callback = CB()


@pytest.mark.parametrize("setup", list(SETUPS))
def test_fp16_overflow_skips_the_whole_update_including_fd(tmp_path, setup):
    coef = SETUPS[setup][1]
    steps = 4
    # init scale 2^30 overflows float16 gradients at the first update; the backoff brings it to 2^10 at once
    run = _trainer(tmp_path, "fp16", "fp16", setup, coef, steps=steps, init_scale=2.0**30, backoff=2.0**-20)
    start = params(run.model)
    fd_start = {k: float(v) for k, v in frobenius_penalty_by_kind(run.model, **fd_coeffs(coef)).items()}
    snap = _Snapshot(run.model)
    run.add_callback(snap.callback)
    run.train()
    for name, value in snap.after_first.items():
        assert torch.equal(value, start[name]), f"{name} changed in the skipped update"
    assert run.accelerator.scaler.get_scale() == 2.0**10  # one backoff, then no overflow
    log1 = [h for h in run.state.log_history if "loss" in h][0]
    for kind, value in fd_start.items():
        assert log1[f"fnl/{kind}/fd"] == pytest.approx(value, rel=SAME)  # unscaled, weights unchanged

    ref1 = _trainer(tmp_path, "fp32-1", "fp32", setup, coef, steps=1)
    ref1.train()
    loss1 = [h for h in ref1.state.log_history if "loss" in h][0]["loss"]
    assert log1["loss"] == pytest.approx(loss1, rel=1e-2)  # the objective, not 2^30 times it

    data = MLMData()
    rest = torch.utils.data.Subset(data, range(4, len(data)))  # the first batch (4 items) never applied
    ref = _trainer(tmp_path, "fp32-rest", "fp32", setup, coef, steps=steps - 1, data=rest)
    ref.train()
    tol = after_n_tolerance("fp16", setup)
    assert param_distance(params(run.model), params(ref.model), start) < tol
    if setup != "coupled":  # the skipped step created no optimizer state: Adam's step counts start with batch 2
        steps_seen = {s["step"] for s in run.optimizer.optimizer.state.values()}
        assert steps_seen == {steps - 1}
