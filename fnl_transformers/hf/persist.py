"""Persistence of patched models: the plan in ``config.json`` and reloading with
:func:`from_pretrained`, which rebuilds the factorized architecture from the plan and loads the weights with
strict key matching.

Why not ``AutoModel.from_pretrained``: it would build the vanilla architecture and *randomly initialize* every
weight the checkpoint names differently (the factors ``U``/``V`` instead of ``weight``), with only a logged
warning. A patched model therefore saves ``attn_implementation`` = :data:`LOAD_MARKER`, a message naming this
function, in its ``config.json``; plain transformers refuses to build the model with that message, and this
loader removes it.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from .config import FNLConfig
from .plan import Plan

CONFIG_KEY = "fnl_config"  # key of the plan in model.config / config.json
# Stored as `attn_implementation` in config.json: plain transformers then refuses to build the model with this
# message (instead of silently re-initializing the factorized layers it does not know).
LOAD_MARKER = ("fnl_transformers checkpoint: load it with fnl_transformers.hf.from_pretrained(path), "
               "or save fnl_transformers.hf.recompose(model) for plain transformers")
MARKER_ATTR = "attn_implementation"


def record_plan(model: nn.Module, plan: Plan) -> None:
    """Store ``plan`` (as JSON-ready data) and the load marker in ``model.config``; keep the FNLConfig on the
    model."""
    setattr(model.config, CONFIG_KEY, plan.to_dict())
    setattr(model.config, MARKER_ATTR, LOAD_MARKER)
    model.fnl_config = plan.config


def forget_plan(model: nn.Module) -> None:
    """Remove what :func:`record_plan` stored (a recomposed model is a plain one)."""
    model.config.__dict__.pop(CONFIG_KEY, None)
    model.config.__dict__.pop(MARKER_ATTR, None)
    model.__dict__.pop("fnl_config", None)


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(getattr(model, "config", None), CONFIG_KEY, None), dict)


def plan_of(model: nn.Module) -> Plan:
    """The plan a patched ``model`` carries (one clear error for an unpatched one)."""
    plan = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not isinstance(plan, dict):
        raise ValueError("this model is not patched by fnl_transformers (no config.fnl_config); use patch_model")
    return Plan.from_dict(plan)


def get_fnl_config(model: nn.Module) -> FNLConfig:
    """The ``FNLConfig`` a patched model was patched with."""
    return plan_of(model).config


WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def from_pretrained(path: str, dtype: Optional[torch.dtype] = None, attn_implementation: Optional[str] = None,
                    device=None) -> PreTrainedModel:
    """Load a model saved (``save_pretrained``) after :func:`fnl_transformers.hf.patch_model`.

    Every parameter and persistent buffer of the rebuilt model must come from the checkpoint (tied weights
    excepted), and every checkpoint tensor must be used, with equal shapes; anything else is an error naming the
    keys. Returns the model in eval mode (as ``transformers`` does), in ``dtype`` if given, else in the dtype
    it was saved in (``config.json``'s ``dtype``), on ``device`` if given.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory with a saved model (config.json and {WEIGHTS})")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json; is it a save_pretrained directory?")
    config = AutoConfig.from_pretrained(path)
    plan = getattr(config, CONFIG_KEY, None)
    if not isinstance(plan, dict):
        raise ValueError(
            f"{path} is not a fnl_transformers checkpoint (its config.json has no {CONFIG_KEY!r}); load it with "
            "transformers' from_pretrained, then patch it with fnl_transformers.hf.patch_model"
        )
    config.__dict__.pop(CONFIG_KEY)
    config.__dict__.pop(MARKER_ATTR, None)
    if config._attn_implementation == LOAD_MARKER:  # transformers read our marker as the attention choice
        config._attn_implementation = None
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise ValueError(f"{path}/config.json names no transformers model class in 'architectures' ({names})")
    saved_dtype = config.dtype if isinstance(config.dtype, torch.dtype) else None
    model = cls(config)
    from .apply import apply_plan  # apply imports this module

    apply_plan(model, Plan.from_dict(plan))
    state = load_state_dict(path)
    _load_strict(model, state, path)
    dtype = dtype or saved_dtype
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of a ``save_pretrained`` directory (single or sharded safetensors)."""
    from safetensors.torch import load_file

    single, index = os.path.join(path, WEIGHTS), os.path.join(path, WEIGHTS_INDEX)
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(load_file(os.path.join(path, name)))
        return state
    raise FileNotFoundError(f"{path} has no {WEIGHTS} (or sharded {WEIGHTS_INDEX}); save with save_pretrained")


def _load_strict(model: PreTrainedModel, state: Dict[str, torch.Tensor], path: str) -> None:
    expected = model.state_dict()
    tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if not (k in tied and tied[k] in state))
    mismatched = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if unexpected or missing or mismatched:
        show = lambda keys: ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")  # noqa
        problems = [f"{what}: {show(keys)}" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise ValueError(
            f"{path}: the weights do not match the architecture its fnl_config describes ({'; '.join(problems)}); "
            "the checkpoint is incomplete or was saved from a different configuration"
        )
    model.load_state_dict(state, strict=False)  # the tied targets are re-tied below
    if tied:
        model.tie_weights(recompute_mapping=False)
