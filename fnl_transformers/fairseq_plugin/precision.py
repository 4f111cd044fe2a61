"""Mixed precision with the plugin's optimizers: ``--fp16``, ``--bf16``, ``--memory-efficient-fp16/-bf16``, ``--amp``.

The plugin's optimizers (``fnl_adam``, ``flambe``, ``fnl_lamb``) give each parameter its own decay (FD, weight
decay or none) and, for ``flambe``, rebuild the decoupled-FD forms from each parameter's ``optim_overrides``. How
each of fairseq's precision wrappers hands them parameters, and what :func:`install` (called when the plugin is
imported; idempotent) changes so that the groups survive in every mode:

* ``--fp16``: ``FP16Optimizer`` keeps float32 master copies and by default copies all parameters into ONE flat
  buffer (one tensor: no per-parameter decay, no forms, and LAMB's per-tensor trust ratio would become one ratio
  for the whole model). With a plugin optimizer the copies are made per parameter, as ``--fp16-no-flatten-grads``
  does (``cfg.common.fp16_no_flatten_grads`` is set, so the checkpoint records it): fairseq copies
  ``optim_overrides`` onto each master copy, the optimizer rebuilds its groups and forms from the copies, decoupled
  FD is computed from the float32 masters, and fairseq copies the updated masters back into the fp16 parameters.
* ``--bf16``: the same ``FP16Optimizer``, which never flattens for bf16, without loss scaling. fairseq's command
  line turns ``--bf16`` into ``--bf16 --tpu`` (``options.parse_args_and_arch``), whose TPU path needs
  ``torch_xla``; where ``torch_xla`` is not installed that run cannot start anywhere, so :func:`resolve_bf16`
  (run before training by :mod:`.launch`) clears ``tpu`` and the run trains in bfloat16 on the GPU (on the CPU
  with ``--cpu``).
* ``--memory-efficient-fp16`` / ``-bf16``: ``MemoryEfficientFP16Optimizer`` hands the optimizer the half-precision
  parameters themselves (groups and forms intact); the optimizer keeps its state in float32, computes the update
  (and FD, core rule: float32 from the half factors) in float32 and rounds the result into the parameter
  (``supports_memory_efficient_fp16``: fairseq's ``adam``, and :class:`~fnl_transformers.optim.Lamb` /
  :class:`~fnl_transformers.optim.FLAMBe`).
* ``--amp``: ``AMPOptimizer`` keeps float32 parameters (groups intact) and torch's ``GradScaler``. fairseq 0.12
  unscales the gradients in ``clip_grad_norm`` (on the torch optimizer) and then steps through
  ``scaler.step(<fairseq optimizer>)``, which the scaler does not know as unscaled and divides by the scale a second
  time (every optimizer sees ``g / scale``). With a plugin optimizer the step goes through
  ``scaler.step(<torch optimizer>)``: unscaled once, skipped when the gradients are not finite.

In every mode the coupled penalty is part of the loss the criterion returns, before fairseq's loss scaler
multiplies it, so it is scaled and unscaled exactly as the cross entropy; an overflowing update is skipped whole
(``FP16Optimizer`` / ``MemoryEfficientFP16Optimizer`` raise ``OverflowError`` in ``clip_grad_norm``, before
``step``; ``GradScaler.step`` skips the optimizer), so decoupled FD, which lives in the optimizer's ``step``, is
skipped with it; the logged ``fd_*`` values are computed before any scaling.
"""

from __future__ import annotations

import importlib.util
import logging
from argparse import Namespace

logger = logging.getLogger(__name__)

_INSTALLED = False


def plugin_optimizer(cfg) -> bool:
    """Whether fairseq's config names one of the plugin's optimizers (``fnl_adam``, ``flambe``, ``fnl_lamb``)."""
    from .model import FD_AWARE_OPTIMIZERS

    optimizer = getattr(cfg, "optimizer", None)
    name = getattr(optimizer, "_name", None) if optimizer is not None else None
    return name in FD_AWARE_OPTIMIZERS


def per_parameter_copies(cfg) -> bool:
    """Make ``FP16Optimizer``'s float32 master copies per parameter (set ``cfg.common.fp16_no_flatten_grads``)
    when a plugin optimizer would otherwise receive one flat buffer; returns whether it changed ``cfg``."""
    common = cfg.common
    if getattr(common, "fp16_no_flatten_grads", False) or getattr(common, "bf16", False) or not plugin_optimizer(cfg):
        return False
    common.fp16_no_flatten_grads = True
    logger.info(
        "fnl: --optimizer %s keeps a decay per parameter, so --fp16 makes per-parameter float32 master "
        "copies (as --fp16-no-flatten-grads)",
        cfg.optimizer._name,
    )
    return True


def _xla_available() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


def resolve_bf16(cfg) -> bool:
    """Clear the ``tpu`` that fairseq's command line adds to ``--bf16`` when ``torch_xla`` is not installed (the
    TPU path cannot run, the bf16 path can), in ``cfg.common`` and every section that copied it; returns whether
    it changed ``cfg``."""
    common = cfg.common
    if not (getattr(common, "bf16", False) and getattr(common, "tpu", False)) or _xla_available():
        return False
    for key in list(cfg.keys()):
        section = cfg[key]
        if isinstance(section, Namespace):
            if getattr(section, "tpu", False):
                section.tpu = False
        elif section is not None and hasattr(section, "keys") and "tpu" in section and section.tpu:
            section.tpu = False
    logger.info(
        "fnl: --bf16 without torch_xla: training in bfloat16 on the %s, not on a TPU",
        "CPU" if getattr(common, "cpu", False) else "GPU",
    )
    return True


def install() -> None:
    """Apply the changes of the module docstring to fairseq (idempotent; imports fairseq)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from fairseq.optim.amp_optimizer import AMPOptimizer
    from fairseq.optim.fp16_optimizer import FP16Optimizer

    from .optim import OPTIMIZERS

    plugin_classes = tuple(cls for cls, _ in OPTIMIZERS.values())

    stock_build = FP16Optimizer.build_optimizer.__func__

    def build_optimizer(cls, cfg, params, **kwargs):
        per_parameter_copies(cfg)
        return stock_build(cls, cfg, params, **kwargs)

    build_optimizer.__wrapped__ = stock_build
    build_optimizer.__doc__ = stock_build.__doc__
    FP16Optimizer.build_optimizer = classmethod(build_optimizer)

    stock_step = AMPOptimizer.step

    def step(self):
        if not isinstance(self.fp32_optimizer, plugin_classes):
            return stock_step(self)
        self.scaler.step(self.optimizer)  # the torch optimizer, which clip_grad_norm unscaled: not unscaled again
        self.scaler.update()

    step.__wrapped__ = stock_step
    AMPOptimizer.step = step

    _INSTALLED = True
