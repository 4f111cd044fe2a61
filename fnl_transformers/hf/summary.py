"""Parameter summary of a (patched) HuggingFace model: :mod:`fnl_transformers.core.summary` with the original
parameter count read from the patch plan (``model.config.fnl_config["params_before"]``) when there is one."""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn

from ..core.summary import format_parameter_summary
from ..core.summary import parameter_summary as _summary
from .persist import CONFIG_KEY


def _original(model: nn.Module) -> Optional[int]:
    plan = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    return plan.get("params_before") if isinstance(plan, dict) else None


def parameter_summary(model: nn.Module) -> Dict[str, Any]:
    """Total, trainable, factorized, attention-form and per-kind parameter counts, and ``original`` (before
    patching) for a patched model (see :mod:`fnl_transformers.core.summary`)."""
    return _summary(model, _original(model))


def print_parameter_summary(model: nn.Module) -> None:
    """Print the summary in one line, like PEFT's ``print_trainable_parameters``."""
    print(format_parameter_summary(parameter_summary(model)))
