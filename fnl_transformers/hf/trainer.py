"""HuggingFace ``Trainer`` integration: Frobenius decay (FD) in the loss or in the optimizer, once per update.

Paper: Khodak et al., ICLR 2021, Definition 3.2: FD penalizes ``lambda/2 ||W||_F^2`` of each factorized
*product*; weight decay on the factors (which ``Trainer`` applies to every tensor not named bias/norm)
penalizes the nuclear norm instead. FLAMBe (the paper's BERT optimizer, Sec. 6 and Table 4) is LAMB with
decoupled FD.

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

* **Loss scaling under gradient accumulation and data parallelism** (:mod:`.loss_scaling`): models whose loss
  ignores ``num_items_in_batch`` (BERT's MLM head, for one) return a per-micro-batch mean that ``Trainer`` does
  not divide by the accumulation steps; ``FNLTrainer`` detects this per forward and reweights the mean by the
  micro-batch's share of the label tokens, so one update with accumulation equals one on the large batch.
* **Coupled FD counts once per update.** Each micro-batch adds ``FD / k`` (``k`` micro-batches in the
  update); data parallel replicas average their identical FD gradients.
* **One decay policy** (:class:`fnl_transformers.core.DecayPolicy`, the same as ``optim.param_groups`` and the
  fairseq plugin's optimizers): factors of forms with FD get FD and never weight decay; biases and norms no
  decay; factors of forms without FD get ``weight_decay`` unless ``weight_decay_factors=False`` (``FNLConfig``
  field); every other weight gets ``weight_decay``.
* **Decoupled FD** (``fd_mode="decoupled"``): the optimizer is ``AdamWFD`` (default) or ``FLAMBe`` built with
  ``optim.param_groups`` (lr, betas, eps, weight decay from ``TrainingArguments``); no penalty in the loss.
* **Diagnostics** (``core.form_diagnostics``: mean ``||W||_F``, ``||W||_*``, the weight-decay bound and the
  effective step ``lr / ||W||_F^2`` per kind, and the FD value per kind) are added to each training log as
  ``fnl/<kind>/<quantity>``. The logged ``loss`` is the objective: task loss plus coupled FD.
* **Non-finite guard**: a NaN/Inf loss raises :class:`~fnl_transformers.core.NonFiniteError` naming the
  parameter and layer that holds it, or the FD kind / task loss that overflowed (``Trainer``'s own
  ``logging_nan_inf_filter`` would silently hide it). Checkpoints are checked before they are written.
* **FSDP2** (``fully_shard`` applied to the patched model before ``FNLTrainer``, launched with ``torchrun``; or
  Trainer's ``fsdp`` arguments with ``fsdp_config={"version": 2}``): FD from the local shards plus one all-reduce
  of k x k pieces (:mod:`fnl_transformers.core.sharded`), never a gathered factor. Coupled FD adds ``dFD/dp / k``
  to the shards' gradients before each forward pass (FSDP2 adds the task gradient to it); the optimizers route
  DTensor parameters there themselves. Logs carry ``fnl/<kind>/fd`` only. DeepSpeed and FSDP1 are refused with FD.
* **Checkpoints of a patched model are marked** (:mod:`.guard`: its ``save_pretrained`` marks them, so plain
  transformers cannot load them wrongly); resuming (``resume_from_checkpoint``) and ``load_best_model_at_end`` read
  the weights of marked checkpoints through :func:`~fnl_transformers.hf.guard.load_weights`.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
from torch import nn
from transformers import Trainer

from ..core import (
    FD_MODES,
    KINDS,
    WEIGHT_DECAY,
    DecayPolicy,
    FDSpec,
    NonFiniteError,
    SettingsError,
    check_finite,
    form_diagnostics,
    form_parameters,
    form_sq_norms,
    frobenius_penalty_by_kind,
    iter_forms,
)
from ..core.sharded import check_sharded_forms, holds_dtensors, local_part, model_sharded_fd, model_specs
from . import guard
from .config import FNLConfig
from .loss_scaling import label_count, watch_num_items, zero_with_graph

FD_OPTIMIZERS = ("adamwfd", "flambe")


def fd_spec(config) -> FDSpec:
    """The :class:`~fnl_transformers.core.FDSpec` of an ``FNLConfig``, an ``FDSpec``, or a dict ``{kind: lambda}``
    (kinds among ``linear``, ``embedding``, ``qk``, ``ov``; a missing embedding follows linear)."""
    if isinstance(config, FDSpec):
        return config
    if isinstance(config, FNLConfig):
        return config.fd
    if isinstance(config, dict):
        unknown = set(config) - set(KINDS)
        if unknown:
            raise ValueError(f"FD coefficients: unknown kinds {sorted(unknown)}; use keys among {KINDS}")
        try:
            return FDSpec(**config)
        except SettingsError as e:
            raise e.spelled(lambda name: f"FD coefficient for {name[3:]!r}") from None
    raise ValueError(
        f"fnl_config of type {type(config).__name__} is not an FNLConfig; pass a fnl_transformers.hf.FNLConfig, "
        "an FDSpec or a dict {'linear': .., 'embedding': .., 'qk': .., 'ov': ..}"
    )


def _model_config(model: nn.Module):
    """The FNLConfig ``patch_model`` / ``from_pretrained`` left on ``model``, or None."""
    from .persist import get_fnl_config, is_patched

    cfg = getattr(model, "fnl_config", None)
    if cfg is None and is_patched(model):
        cfg = get_fnl_config(model)
    return cfg


def is_fd_optimizer(optimizer) -> bool:
    """Whether ``optimizer`` applies decoupled FD (an ``fnl_transformers.optim`` group with active ``fd``)."""
    groups = getattr(optimizer, "param_groups", None) or []
    return any(g.get("fd_forms") and any(g.get("fd", {}).values()) for g in groups)


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class FNLTrainer(Trainer):
    """``transformers.Trainer`` with Frobenius decay on factorized forms (see the module docstring).

    Args (besides ``Trainer``'s):
        fnl_config: an ``FNLConfig`` (or an ``FDSpec``, or a ``{kind: lambda}`` dict) with the FD coefficients
            ``fd_linear``, ``fd_embedding``, ``fd_qk``, ``fd_ov``, the mode and ``weight_decay_factors``.
            Defaults to the configuration ``patch_model`` stored on the model.
        fd: ``"coupled"`` (``lambda/2 ||W||_F^2`` added to the loss; the optimizer is ``Trainer``'s, with the decay
            policy's groups) or ``"decoupled"`` (FD inside ``fd_optimizer``). Defaults to the config's choice.
        fd_optimizer: for ``fd="decoupled"``: ``"adamwfd"`` (default; ``lr``, betas, eps and weight decay from
            ``TrainingArguments``) or ``"flambe"`` (LAMB with decoupled FD).
        weight_decay_factors: weight decay on factors of forms without FD (default: the config's, else True).
        fnl_diagnostics: add ``core.form_diagnostics`` and the FD value per kind to each training log.
        check_finite: raise :class:`NonFiniteError` naming the layer on a NaN/Inf loss or factor.
    """

    # compute_loss returns a loss already normalized over the accumulated batch: Trainer must not rescale it.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args,
        fnl_config=None,
        fd: Optional[str] = None,
        fd_optimizer: str = "adamwfd",
        weight_decay_factors: Optional[bool] = None,
        fnl_diagnostics: bool = True,
        check_finite: bool = True,
        **kwargs,
    ):
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
        spec = fd_spec(config)
        self.fd = spec if fd is None else FDSpec(spec.linear, spec.embedding, spec.qk, spec.ov, fd)
        if weight_decay_factors is None:
            weight_decay_factors = config.weight_decay_factors if isinstance(config, FNLConfig) else True
        self.policy = DecayPolicy(self.fd, weight_decay_factors=weight_decay_factors)
        self.fd_optimizer = fd_optimizer
        self.fnl_diagnostics, self.check_finite = fnl_diagnostics, check_finite
        self.fd.check_present(kind for _, _, kind in form_parameters(model))
        if self.optimizer is not None and self.fd.coupled and is_fd_optimizer(self.optimizer):
            raise ValueError(
                "the optimizer passed in `optimizers` applies decoupled FD and fd='coupled' adds FD to the loss: "
                "FD would count twice; pass fd='decoupled' (or an optimizer without FD groups)"
            )
        if self.optimizer is not None and self.fd.decoupled and not is_fd_optimizer(self.optimizer):
            raise ValueError(
                f"fd='decoupled' with FD on {list(self.fd.active)}, but the optimizer passed in `optimizers` applies "
                "no FD: pass FLAMBe/AdamWFD(fnl_transformers.optim.param_groups(model, ...)), or leave `optimizers` "
                "unset"
            )
        if self.fd.active and getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                "FNLTrainer computes FD from whole or FSDP2-sharded parameters; DeepSpeed flattens them: train with "
                "DDP (torchrun) or FSDP2 (fsdp='full_shard', fsdp_config={'version': 2}) instead of deepspeed"
            )
        fsdp = getattr(self, "is_fsdp_enabled", False)
        if self.fd.active and fsdp and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "FNLTrainer computes FD on FSDP2 (DTensor) shards; FSDP1 flattens the parameters: pass "
                "fsdp_config={'version': 2}"
            )
        # FSDP2: by accelerate (fsdp arguments; the model is sharded when training starts) or by the user
        # (fully_shard applied to the patched model before FNLTrainer): FD from local shards, core.sharded
        self.fd_sharded = fsdp or holds_dtensors(model)
        if holds_dtensors(model) and not fsdp:
            if self.args.save_strategy != "no":
                raise ValueError(
                    "FNLTrainer on a model sharded with fully_shard writes no checkpoints (Trainer has no format for "
                    "its sharded optimizer state): pass save_strategy='no' and save after training with "
                    "torch.distributed.checkpoint"
                )
            check_sharded_forms(model, self.fd.coefficients())  # e.g. a head split between two processes
            # Trainer's branch for a model that owns its placement and gradient reduction: no DDP wrap
            self.is_distributed_loading_by_transformers = True

    @property
    def fd_mode(self) -> str:
        return self.fd.mode

    @property
    def coupled(self) -> bool:
        return self.fd.coupled

    # ---- optimizer ----------------------------------------------------------------------------------

    def get_decay_parameter_names(self, model: nn.Module):
        """Names of the parameters the decay policy gives weight decay (FD factors, biases and norms excluded)."""
        return [name for name, _, decay in self.policy.assign(model) if decay == WEIGHT_DECAY]

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.fd.mode == "decoupled":
            from .. import optim

            coeffs = self.fd
            groups = optim.param_groups(
                self.model if model is None else model,
                fd_linear=coeffs.linear,
                fd_embedding=coeffs.embedding,
                fd_qk=coeffs.qk,
                fd_ov=coeffs.ov,
                weight_decay=self.args.weight_decay,
                weight_decay_factors=self.policy.weight_decay_factors,
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
        if self.coupled and self.fd_sharded:  # before the forward pass: the parameters are sharded
            fd_value = self._add_sharded_fd(_unwrap(model), k)
        if custom:
            # user-defined loss: Trainer's own normalization rule applies to it
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        else:
            with watch_num_items(_unwrap(model)) as spies:
                loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            count = label_count(inputs, getattr(self, "_loss_shifts_labels", False))  # Trainer's counting rule
            scaled = num_items_in_batch is not None and count is not None
            if scaled and not any(spy.used for spy in spies):
                # the model ignored num_items_in_batch and returned its mean over this micro-batch:
                # mean_micro * n_micro / N = sum_micro / N, the large-batch mean split over micro-batches
                # (Trainer already applied its replica factor, as for a model that reads num_items_in_batch)
                loss = zero_with_graph(outputs) if count == 0 else loss * (count / num_items_in_batch)
        task = loss if scaled else loss / k
        total = task
        fd_parts: Dict[str, torch.Tensor] = {}
        if self.coupled and self.fd_sharded:
            total = task + fd_value.to(task.dtype) / k  # the objective, as logged; its gradient is already added
        elif self.coupled:
            with torch.autocast(total.device.type, enabled=False):  # FD in float32 even under mixed precision
                fd_parts = frobenius_penalty_by_kind(_unwrap(model), **self.fd.coefficients())  # Definition 3.2
            if fd_parts:
                total = task + torch.stack(list(fd_parts.values())).sum() / k  # k micro-batches: FD once per update
        if self.check_finite and not bool(torch.isfinite(total.detach()).all()):
            self._report_non_finite(model, task, fd_parts)
        # Trainer must not divide again: report the loss as already scaled for this call
        return (total, outputs) if return_outputs else total

    def _add_sharded_fd(self, model: nn.Module, k: int) -> torch.Tensor:
        """Coupled FD on FSDP2-sharded parameters: the penalty (the same on every process) and ``dFD/dp / k``
        added to each parameter's local gradient, from local shards and one all-reduce of k x k pieces
        (:func:`~fnl_transformers.core.sharded.model_sharded_fd`). FSDP2 adds the reduce-scattered task gradient
        to a gradient already present, so FD counts once per update whatever the accumulation, and is not
        averaged over processes (each shard's FD gradient is complete on the process that holds it)."""
        penalty, grads = model_sharded_fd(model, self.fd.coefficients())
        params = {id(p): p for p in model.parameters()}
        with torch.no_grad():
            for pid, g in grads.items():
                p = params[pid]
                g = g.to(p.dtype) / k
                if p.grad is None:
                    p.grad = g
                else:
                    local_part(p.grad).add_(local_part(g))
        return penalty.detach()

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self):
        """``no_sync`` for a model the user sharded with ``fully_shard`` (Trainer's own version reads the
        ``DistributedConfig`` of a model sharded at load time): FSDP2 reduce-scatters once, after the last
        micro-batch of an update."""
        if getattr(self.model.config, "distributed_config", None) is not None:
            with super()._defer_fsdp_gradient_reduction():
                yield
            return
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def _report_non_finite(self, model, task: torch.Tensor, fd_parts: Dict[str, torch.Tensor]) -> None:
        step = self.state.global_step
        check_finite(_unwrap(model))  # raises naming the parameter and its layer, if one is non-finite
        for kind, value in fd_parts.items():
            if bool(torch.isfinite(value.detach()).all()):
                continue
            for name, _, _, bound in iter_forms(_unwrap(model), (kind,)):
                with torch.no_grad():
                    sq = form_sq_norms(bound)
                if not bool(torch.isfinite(sq).all()):
                    raise NonFiniteError(
                        f"step {step}: ||W||_F^2 of the {kind!r} form of layer {name!r} overflows float32 "
                        f"({float(sq[~torch.isfinite(sq)][0])}) although its factors are finite; lower the learning "
                        f"rate or fd_{kind}"
                    )
            raise NonFiniteError(f"step {step}: the FD penalty of kind {kind!r} is {float(value)}; lower fd_{kind}")
        raise NonFiniteError(
            f"step {step}: the task loss is {float(task.detach().float().sum())} with finite parameters: the "
            "forward pass overflowed or the batch is bad; check the inputs, lower the learning rate, or use fp32"
        )

    # ---- logging and checkpoints --------------------------------------------------------------------

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if self.fnl_diagnostics and "loss" in logs and self.model is not None and self.fd_sharded:
            # sharded: the FD value per kind from local shards (one all-reduce each); the norm diagnostics
            # (nuclear norms, ...) would need whole factors and are left out
            coeffs, model = self.fd.coefficients(), _unwrap(self.model)
            present = {spec.kind for spec in model_specs(model)}
            for kind in (k for k in self.fd.active if k in present):
                penalty, _ = model_sharded_fd(model, {kind: coeffs[kind]})
                logs[f"fnl/{kind}/fd"] = float(penalty)
        elif self.fnl_diagnostics and "loss" in logs and self.model is not None:
            lr = logs.get("learning_rate")
            diag = form_diagnostics(_unwrap(self.model), lr=lr if isinstance(lr, (int, float)) else None)
            logs.update({f"fnl/{k}": v for k, v in diag.items()})
            with torch.no_grad():
                fd = frobenius_penalty_by_kind(_unwrap(self.model), **self.fd.coefficients())
            logs.update({f"fnl/{kind}/fd": float(v) for kind, v in fd.items()})
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        if self.check_finite:
            try:
                check_finite(_unwrap(self.model))
            except NonFiniteError as e:
                raise NonFiniteError(f"step {self.state.global_step}: not saving a checkpoint: {e}") from None
        return super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not _marked(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_marked(resume_from_checkpoint, self.model if model is None else model)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if best is None or not _marked(best):
            return super()._load_best_model()
        self._load_marked(best, self.model)

    def _load_marked(self, checkpoint: str, model: nn.Module) -> None:
        """Weights of a marked checkpoint (``fnl_model.safetensors``), as ``Trainer`` loads a plain one."""
        load_result = _unwrap(model).load_state_dict(guard.load_weights(checkpoint), False)
        self._issue_warnings_after_load(load_result)


def _marked(path) -> bool:
    import os

    return path is not None and os.path.isfile(os.path.join(path, "config.json")) and guard.is_marked(path)


__all__ = ["FNLTrainer", "FD_OPTIMIZERS", "fd_spec", "is_fd_optimizer"]
