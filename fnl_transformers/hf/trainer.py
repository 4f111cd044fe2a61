"""HuggingFace ``Trainer`` integration: Frobenius decay (FD) in the loss or in the optimizer, once per update.

Paper: Khodak et al., ICLR 2021, Sec. 3.2, Eq. (3): FD penalizes ``lambda/2 ||W||_F^2`` of each factorized
*product*; weight decay on the factors (which ``Trainer`` applies to every tensor not named bias/norm)
would penalize the nuclear norm instead. FLAMBe (the paper's BERT optimizer) is LAMB with decoupled FD.

Two ways to use it, each adding at most two lines to a ``Trainer`` script::

    model = patch_model(model, FNLConfig(rank_scale=0.5, fd_qk=1e-4, fd_ov=1e-4))   # fd_mode="coupled"
    trainer = FNLTrainer(model=model, args=args, train_dataset=ds)                  # was: Trainer(...)

FNLTrainer takes the FD coefficients and ``fd_mode`` (``"coupled"``: penalty in the loss; ``"decoupled"``:
``AdamWFD``, or ``FLAMBe`` with ``fd_optimizer="flambe"``) from the patched model's ``FNLConfig``. Or keep a
plain ``Trainer`` and give it an FD optimizer (decoupled FD; ``param_groups`` gives factors no weight decay)::

    opt = FLAMBe(param_groups(model, fd_qk=1e-4, fd_ov=1e-4, weight_decay=0.01), lr=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))

(a plain ``Trainer`` keeps its gradient-accumulation scaling, see below: with accumulation on models such as
BERT MLM use ``FNLTrainer``).

What :class:`FNLTrainer` changes, and why:

* **Loss scaling under gradient accumulation and data parallelism.** ``Trainer`` passes ``num_items_in_batch``
  (the label count of the whole accumulated, and with ``average_tokens_across_devices`` global, batch) to
  every model whose ``forward`` takes ``**kwargs`` and then assumes the returned loss is a sum divided by that
  count, never dividing it by the accumulation steps. Models whose loss goes through ``self.loss_function``
  (GPT-2, Llama) do that; others (BERT's MLM head, for one) ignore it and return a per-micro-batch mean, so
  their gradients come out ``gradient_accumulation_steps`` times too large and token weighting is lost.
  ``FNLTrainer`` watches each forward's ``loss_function`` call: if ``num_items_in_batch`` did not reach it,
  the model's mean is reweighted by ``n_micro / num_items_in_batch`` (the micro-batch's share of the label
  tokens, counted as ``Trainer`` counts them). Either way one update with accumulation equals one update on
  the large batch. (Exact for models whose own mean is over the labels that are not ``-100``.)
* **Coupled FD counts once per update.** Each micro-batch adds ``FD / k`` (``k`` micro-batches in the
  update); data parallel replicas average their identical FD gradients.
* **No weight decay on factors.** ``U``, ``V``, ``M`` of factorized layers, and the attention projections of
  every form kind with a nonzero FD coefficient (``core.form_parameters``), are removed from the weight-decay
  group; FD regularizes them instead. Attention projections of kinds without FD are ordinary dense weights and
  keep ``weight_decay`` (the paper's FLAMBe setting: FD on OV, regular decay elsewhere).
* **Decoupled FD** (``fd_mode="decoupled"``): the optimizer is ``AdamWFD`` (default) or ``FLAMBe`` built with
  ``optim.param_groups`` (lr, betas, eps, weight decay from ``TrainingArguments``); no penalty in the loss.
  Factorized-layer factors whose kind has coefficient 0 get neither FD nor weight decay, in both modes.
* **Diagnostics** (``core.form_diagnostics``: mean ``||W||_F``, ``||W||_*``, the weight-decay bound and the
  effective step ``lr / ||W||_F^2`` per kind, and the FD value per kind) are added to each training log as
  ``fnl/<kind>/<quantity>``. The logged ``loss`` is the objective: task loss plus coupled FD.
* **Non-finite guard**: a NaN/Inf loss raises :class:`~fnl_transformers.core.NonFiniteError` naming the
  parameter and layer that holds it, or the FD kind / task loss that overflowed (``Trainer``'s own
  ``logging_nan_inf_filter`` would silently hide it). Checkpoints are checked before they are written.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer

from ..core import (
    KINDS,
    NonFiniteError,
    check_finite,
    form_diagnostics,
    form_parameters,
    form_sq_norms,
    frobenius_penalty_by_kind,
    iter_forms,
)

FD_MODES = ("coupled", "decoupled")
FD_OPTIMIZERS = ("adamwfd", "flambe")


def fd_coefficients(config) -> Dict[str, float]:
    """``{kind: lambda}`` from an ``FNLConfig`` (fields ``fd_linear``, ``fd_embedding``, ``fd_qk``, ``fd_ov``)
    or a dict with keys among ``linear``, ``embedding``, ``qk``, ``ov``."""
    if isinstance(config, dict):
        unknown = set(config) - set(KINDS)
        if unknown:
            raise ValueError(f"FD coefficients: unknown kinds {sorted(unknown)}; use keys among {KINDS}")
        raw = {k: config.get(k, 0.0) for k in KINDS}
    else:
        missing = [f"fd_{k}" for k in KINDS if not hasattr(config, f"fd_{k}")]
        if missing:
            raise ValueError(
                f"fnl_config of type {type(config).__name__} lacks {missing}; pass a fnl_transformers.hf.FNLConfig "
                "or a dict {'linear': .., 'embedding': .., 'qk': .., 'ov': ..}"
            )
        raw = {k: getattr(config, f"fd_{k}") for k in KINDS}
    out = {}
    for kind, value in raw.items():
        value = 0.0 if value is None else value
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"FD coefficient for {kind!r} must be a number >= 0, got {value!r}") from None
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"FD coefficient for {kind!r} must be a finite number >= 0, got {value!r}")
        out[kind] = value
    return out


def _model_config(model: nn.Module):
    """The FNLConfig ``patch_model`` / ``from_pretrained`` left on ``model``, or None."""
    from .patch import get_fnl_config, is_patched

    cfg = getattr(model, "fnl_config", None)
    if cfg is None and is_patched(model):
        cfg = get_fnl_config(model)
    return cfg


def _fd_mode_of(config) -> Optional[str]:
    """The coupled/decoupled choice an FNLConfig carries (``fd_mode``), None for a dict."""
    return getattr(config, "fd_mode", None)


def is_fd_optimizer(optimizer) -> bool:
    """Whether ``optimizer`` applies decoupled FD (an ``fnl_transformers.optim`` group with active ``fd``)."""
    groups = getattr(optimizer, "param_groups", None) or []
    return any(g.get("fd_forms") and any(g.get("fd", {}).values()) for g in groups)


def label_count(inputs: dict, shift: bool = False) -> Optional[int]:
    """Number of label entries that are not ``-100`` in one micro-batch, counted as ``Trainer`` counts
    ``num_items_in_batch`` (``shift_labels`` if given, else ``labels[..., 1:]`` for causal-LM losses)."""
    labels = inputs.get("shift_labels")
    if labels is None:
        labels = inputs.get("labels")
        if labels is None or not torch.is_tensor(labels):
            return None
        if shift:
            labels = labels[..., 1:]
    return int(labels.ne(-100).sum())


class _NumItemsSpy:
    """Stands in for a model's ``loss_function`` during one forward and records whether ``num_items_in_batch``
    reached it (then the model's loss is a sum over the accumulated batch divided by that count)."""

    def __init__(self, module: nn.Module):
        self.module, self.used = module, False
        self.own = vars(module).get("_loss_function")  # a loss function the user set on the model, if any

    def __call__(self, *args, **kwargs):
        self.used = self.used or kwargs.get("num_items_in_batch") is not None
        return self._function()(*args, **kwargs)

    def _function(self):
        if self.own is not None:
            return self.own
        del self.module._loss_function  # the model's own choice (from its loss_type), then the spy goes back
        try:
            return self.module.loss_function
        finally:
            self.module._loss_function = self


@contextlib.contextmanager
def _watch_num_items(model: nn.Module):
    """Spy on the ``loss_function`` of every ``PreTrainedModel`` inside ``model`` for one forward."""
    spies = [_NumItemsSpy(m) for m in model.modules() if isinstance(m, PreTrainedModel)]
    try:
        for spy in spies:
            spy.module._loss_function = spy
        yield spies
    finally:
        for spy in spies:
            if spy.own is not None:
                spy.module._loss_function = spy.own
            else:
                vars(spy.module).pop("_loss_function", None)


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class FNLTrainer(Trainer):
    """``transformers.Trainer`` with Frobenius decay on factorized forms (see the module docstring).

    Args (besides ``Trainer``'s):
        fnl_config: an ``FNLConfig`` (or ``{kind: lambda}`` dict) with the FD coefficients ``fd_linear``,
            ``fd_embedding``, ``fd_qk``, ``fd_ov``. Defaults to the configuration ``patch_model`` stored on the
            model.
        fd: ``"coupled"`` (``lambda/2 ||W||_F^2`` added to the loss; the optimizer is ``Trainer``'s, without
            weight decay on factors) or ``"decoupled"`` (FD inside ``fd_optimizer``). Defaults to the
            config's choice, else ``"coupled"``.
        fd_optimizer: for ``fd="decoupled"``: ``"adamwfd"`` (default; ``lr``, betas, eps and weight decay from
            ``TrainingArguments``) or ``"flambe"`` (LAMB with decoupled FD).
        fnl_diagnostics: add ``core.form_diagnostics`` and the FD value per kind to each training log.
        check_finite: raise :class:`NonFiniteError` naming the layer on a NaN/Inf loss or factor.
    """

    # compute_loss returns a loss already normalized over the accumulated batch: Trainer must not rescale it.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, fnl_config=None, fd: Optional[str] = None, fd_optimizer: str = "adamwfd",
                 fnl_diagnostics: bool = True, check_finite: bool = True, **kwargs):
        if "loss_is_scaled_for_ga" not in vars(Trainer):  # added in transformers 5.19.0
            import transformers

            raise ImportError(
                f"FNLTrainer needs transformers >= 5.19 (Trainer.loss_is_scaled_for_ga); installed "
                f"{transformers.__version__}: pip install -U 'transformers>=5.19' (or use a plain Trainer with "
                "optimizers=(FLAMBe(param_groups(model, ...)), None))"
            )
        if fd is not None and fd not in FD_MODES:
            raise ValueError(f"fd must be one of {FD_MODES}, got {fd!r}")
        if fd_optimizer not in FD_OPTIMIZERS:
            raise ValueError(f"fd_optimizer must be one of {FD_OPTIMIZERS}, got {fd_optimizer!r}")
        super().__init__(*args, **kwargs)
        model = _unwrap(self.model)
        config = fnl_config if fnl_config is not None else _model_config(model)
        if config is None:
            raise ValueError(
                "FNLTrainer needs the FD coefficients: pass fnl_config=FNLConfig(...) (or a dict "
                "{'linear': .., 'qk': .., ...}), or patch the model with fnl_transformers.hf.patch_model first"
            )
        self.fd_coefficients = fd_coefficients(config)
        mode = fd if fd is not None else (_fd_mode_of(config) or "coupled")
        if mode not in FD_MODES:
            raise ValueError(f"fnl_config.fd_mode must be one of {FD_MODES}, got {mode!r}")
        self.fd_mode, self.fd_optimizer = mode, fd_optimizer
        self.fnl_diagnostics, self.check_finite = fnl_diagnostics, check_finite
        active = [k for k, v in self.fd_coefficients.items() if v > 0]
        present = {kind for _, _, kind in form_parameters(model)}
        absent = [k for k in active if k not in present]
        if absent:
            raise ValueError(
                f"FD is set for kinds {absent} but the model has no forms of those kinds (it has {sorted(present)}); "
                "patch the model (fnl_transformers.hf.patch_model) or set those coefficients to 0"
            )
        if self.optimizer is not None and self.coupled and is_fd_optimizer(self.optimizer):
            raise ValueError(
                "the optimizer passed in `optimizers` applies decoupled FD and fd='coupled' adds FD to the loss: "
                "FD would count twice; pass fd='decoupled' (or an optimizer without FD groups)"
            )
        if self.optimizer is not None and mode == "decoupled" and active and not is_fd_optimizer(self.optimizer):
            raise ValueError(
                f"fd='decoupled' with FD on {active}, but the optimizer passed in `optimizers` applies no FD: "
                "pass FLAMBe/AdamWFD(fnl_transformers.optim.param_groups(model, ...)), or leave `optimizers` unset"
            )
        if active and (getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)):
            raise ValueError(
                "FNLTrainer computes FD from whole parameters; FSDP and DeepSpeed shard or flatten them: "
                "train with DDP (torchrun, no fsdp/deepspeed arguments)"
            )

    @property
    def coupled(self) -> bool:
        return self.fd_mode == "coupled" and any(v > 0 for v in self.fd_coefficients.values())

    # ---- optimizer ----------------------------------------------------------------------------------

    def _factor_ids(self, model: nn.Module) -> set:
        """Parameters that never take weight decay: factorized-layer factors (weight decay on ``U`` and ``V``
        would be a nuclear-norm penalty) and the projections of attention forms whose kind has FD."""
        kinds = {"linear", "embedding"} | {k for k, v in self.fd_coefficients.items() if v > 0}
        return {id(p) for _, p, _ in form_parameters(model, tuple(kinds))}

    def get_decay_parameter_names(self, model: nn.Module):
        """``Trainer``'s rule (all but bias/norm) minus the factors FD regularizes (:meth:`_factor_ids`)."""
        names = set(super().get_decay_parameter_names(model))
        factors = self._factor_ids(model)
        return [n for n, p in model.named_parameters() if n in names and id(p) not in factors]

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.fd_mode == "decoupled":
            from .. import optim

            opt_model = self.model if model is None else model
            factors = self._factor_ids(opt_model)
            groups = optim.param_groups(
                opt_model,
                fd_linear=self.fd_coefficients["linear"],
                fd_embedding=self.fd_coefficients["embedding"],
                fd_qk=self.fd_coefficients["qk"],
                fd_ov=self.fd_coefficients["ov"],
                weight_decay=self.args.weight_decay,
                # factors of kinds whose coefficient is 0 get neither FD nor weight decay, as in coupled mode
                no_decay=lambda name, p, module: id(p) in factors or optim.default_no_decay(name, p, module),
            )
            cls = {"adamwfd": optim.AdamWFD, "flambe": optim.FLAMBe}[self.fd_optimizer]
            self.optimizer = cls(
                groups,
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
            return self.optimizer
        return super().create_optimizer(model)

    # ---- loss ---------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        custom = self.label_smoother is not None or self.compute_loss_func is not None
        if not model.training:  # evaluation / prediction: the task loss, a per-batch mean for every model
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch if custom else None)
        k = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        if custom:
            # user-defined loss: Trainer's own normalization rule applies to it
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        else:
            with _watch_num_items(_unwrap(model)) as spies:
                loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            count = label_count(inputs, getattr(self, "_loss_shifts_labels", False))  # Trainer's counting rule
            scaled = num_items_in_batch is not None and count is not None
            if scaled and not any(spy.used for spy in spies):
                # the model ignored num_items_in_batch and returned its mean over this micro-batch:
                # mean_micro * n_micro / N = sum_micro / N, the large-batch mean split over micro-batches
                # (Trainer already applied its replica factor, as for a model that reads num_items_in_batch)
                loss = _zero_with_graph(outputs) if count == 0 else loss * (count / num_items_in_batch)
        task = loss if scaled else loss / k
        total = task
        fd_parts: Dict[str, torch.Tensor] = {}
        if self.coupled:
            with torch.autocast(total.device.type, enabled=False):  # FD in float32 even under mixed precision
                fd_parts = frobenius_penalty_by_kind(_unwrap(model), **self.fd_coefficients)  # lambda/2||W||^2, Eq. 3
            if fd_parts:
                total = task + torch.stack(list(fd_parts.values())).sum() / k  # k micro-batches: FD once per update
        if self.check_finite and not bool(torch.isfinite(total.detach()).all()):
            self._report_non_finite(model, task, fd_parts)
        # Trainer must not divide again: report the loss as already scaled for this call
        return (total, outputs) if return_outputs else total

    def _report_non_finite(self, model, task: torch.Tensor, fd_parts: Dict[str, torch.Tensor]) -> None:
        step = self.state.global_step
        check_finite(_unwrap(model))  # raises naming the parameter and its layer, if one is non-finite
        for kind, value in fd_parts.items():
            if bool(torch.isfinite(value.detach()).all()):
                continue
            for name, _, spec, bound in iter_forms(_unwrap(model), (kind,)):
                with torch.no_grad():
                    sq = form_sq_norms(bound)
                if not bool(torch.isfinite(sq).all()):
                    raise NonFiniteError(
                        f"step {step}: ||W||_F^2 of the {kind!r} form of layer {name!r} overflows float32 "
                        f"({float(sq[~torch.isfinite(sq)][0])}) although its factors are finite; lower the learning rate or fd_{kind}"
                    )
            raise NonFiniteError(f"step {step}: the FD penalty of kind {kind!r} is {float(value)}; lower fd_{kind}")
        raise NonFiniteError(
            f"step {step}: the task loss is {float(task.detach().float().sum())} with finite parameters: the "
            "forward pass overflowed or the batch is bad; check the inputs, lower the learning rate, or use fp32"
        )

    # ---- logging and checkpoints --------------------------------------------------------------------

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if self.fnl_diagnostics and "loss" in logs and self.model is not None:
            lr = logs.get("learning_rate")
            diag = form_diagnostics(_unwrap(self.model), lr=lr if isinstance(lr, (int, float)) else None)
            logs.update({f"fnl/{k}": v for k, v in diag.items()})
            with torch.no_grad():
                fd = frobenius_penalty_by_kind(_unwrap(self.model), **self.fd_coefficients)
            logs.update({f"fnl/{kind}/fd": float(v) for kind, v in fd.items()})
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        if self.check_finite:
            try:
                check_finite(_unwrap(self.model))
            except NonFiniteError as e:
                raise NonFiniteError(f"step {self.state.global_step}: not saving a checkpoint: {e}") from None
        return super()._save_checkpoint(model, trial)


def _zero_with_graph(outputs) -> torch.Tensor:
    """An exact zero that still reaches the parameters (the mean over zero labels is NaN)."""
    logits = outputs.get("logits") if isinstance(outputs, dict) else None
    if logits is None:
        raise ValueError("a micro-batch has no labels != -100 and the model returned no logits to build a zero loss")
    return logits.sum() * 0.0


__all__ = ["FNLTrainer", "FD_MODES", "FD_OPTIMIZERS", "fd_coefficients", "is_fd_optimizer", "label_count"]
