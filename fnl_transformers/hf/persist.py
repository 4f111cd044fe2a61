"""Persistence of patched models: the plan in ``config.json`` and reloading with
:func:`from_pretrained`, which rebuilds the factorized architecture from the plan and loads the weights with
strict key matching.

Why not ``AutoModel.from_pretrained``: it would build the vanilla architecture and *randomly initialize* every
weight the checkpoint names differently (the factors ``U``/``V`` instead of ``weight``), with only a logged
warning. A patched model therefore saves ``attn_implementation`` = :data:`LOAD_MARKER`, a message naming this
function, in its ``config.json``; plain transformers refuses to build the model with that message, and a
directory marked by :func:`fnl_transformers.hf.guard.mark_checkpoint` cannot be read by plain transformers at all
(see :mod:`.guard`); this loader removes the marks. Every save of a patched model is marked: a patched model's
``save_pretrained`` (and so ``Trainer`` checkpoints, ``push_to_hub``) marks the directory it writes. ``path`` may
also be a Hugging Face Hub model id, resolved through the local cache (only the cache when offline:
``HF_HUB_OFFLINE=1`` or ``local_files_only=True``).
"""

from __future__ import annotations

import os
import re
import types
from typing import Dict, Optional, Union

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from . import guard
from .config import FNLConfig
from .plan import Plan

CONFIG_KEY = "fnl_config"  # key of the plan in model.config / config.json
# Stored as `attn_implementation` in config.json: plain transformers then refuses to build the model with this
# message (instead of silently re-initializing the factorized layers it does not know).
LOAD_MARKER = (
    "fnl_transformers checkpoint: load it with fnl_transformers.hf.from_pretrained(path), "
    "or save fnl_transformers.hf.recompose(model) for plain transformers"
)
MARKER_ATTR = "attn_implementation"


def record_plan(model: nn.Module, plan: Plan) -> None:
    """Store ``plan`` (as JSON-ready data) and the load marker in ``model.config``; keep the FNLConfig on the
    model; make its ``save_pretrained`` mark what it writes (:func:`save_pretrained`)."""
    setattr(model.config, CONFIG_KEY, plan.to_dict())
    setattr(model.config, MARKER_ATTR, LOAD_MARKER)
    model.fnl_config = plan.config
    model.save_pretrained = types.MethodType(save_pretrained, model)


def record_fidelity(model: nn.Module, report: dict) -> None:
    """Store an output-level comparison with the original model (:func:`fnl_transformers.hf.fidelity.fidelity_report`;
    its per-text cosines left out) in the plan of a patched ``model``, so ``config.json`` (and ``fnl inspect``)
    carries it."""
    plan = getattr(model.config, CONFIG_KEY, None)
    if not isinstance(plan, dict):
        raise ValueError("this model is not patched by fnl_transformers (no config.fnl_config); use patch_model")
    summary = dict(report)
    summary["cosine"] = {k: v for k, v in report["cosine"].items() if k != "per_text"}
    plan["fidelity"] = summary


def forget_plan(model: nn.Module) -> None:
    """Remove what :func:`record_plan` stored (a recomposed model is a plain one)."""
    model.config.__dict__.pop(CONFIG_KEY, None)
    model.config.__dict__.pop(MARKER_ATTR, None)
    model.__dict__.pop("fnl_config", None)
    model.__dict__.pop("save_pretrained", None)


def save_pretrained(self: PreTrainedModel, save_directory, *args, **kwargs):
    """A patched model's ``save_pretrained``: transformers' own, then
    :func:`~fnl_transformers.hf.guard.mark_checkpoint` on the directory (on the process that writes it), so no save
    of a patched model can be loaded wrongly by plain transformers. ``push_to_hub=True`` is refused (the upload would
    happen before the marks); ``model.push_to_hub(repo_id)`` saves through this method and uploads marked files."""
    if kwargs.get("push_to_hub"):
        raise ValueError(
            "save_pretrained(..., push_to_hub=True) would upload a patched checkpoint before "
            "fnl_transformers marks it: save it, then call model.push_to_hub(repo_id), which saves "
            "through this method"
        )
    out = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    is_main = kwargs.get("is_main_process", args[0] if args else True)
    should = getattr(self, "should_save_on_this_rank", None)
    if (should(is_main) if callable(should) else is_main) and os.path.isdir(save_directory):
        guard.mark_checkpoint(save_directory)
    return out


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


WEIGHTS = guard.PLAIN_WEIGHTS
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def from_pretrained(
    path: str,
    dtype: Union[torch.dtype, str, None] = None,
    attn_implementation: Optional[str] = None,
    device=None,
    *,
    torch_dtype: Union[torch.dtype, str, None] = None,
    device_map=None,
    cache_dir: Optional[str] = None,
    revision: Optional[str] = None,
    local_files_only: bool = False,
) -> PreTrainedModel:
    """Load a model saved (``save_pretrained``) after :func:`fnl_transformers.hf.patch_model`.

    Every parameter and persistent buffer of the rebuilt model must come from the checkpoint (tied weights
    excepted), and every checkpoint tensor must be used, with equal shapes; anything else is an error naming the
    keys. Returns the model in eval mode (as ``transformers`` does), in ``dtype`` if given (``torch_dtype`` is
    transformers' older name for it; ``"auto"`` means the saved dtype), else in the dtype it was saved in
    (``config.json``'s ``dtype``), on ``device`` if given. ``device_map`` accepts transformers' single-device forms:
    ``"cpu"``, ``"auto"`` (the first GPU if there is one, else the CPU), a device name or ``torch.device``.
    ``path``: a directory, or a Hub model id found in the local cache (``cache_dir``, ``revision``; see the module
    docstring).
    """
    dtype = _resolve_dtype(dtype, torch_dtype)
    device = _resolve_device(device, device_map)
    path = _resolve_path(os.fspath(path), cache_dir, revision, local_files_only)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json; is it a save_pretrained directory?")
    config = AutoConfig.from_pretrained(path)
    guard.unmark_config(config)
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
    """All tensors of a ``save_pretrained`` directory (single or sharded safetensors, marked by
    :func:`~fnl_transformers.hf.guard.mark_checkpoint` or not); a corrupted file is an error naming it."""
    return guard.load_weights(path)


def _resolve_dtype(dtype, torch_dtype) -> Optional[torch.dtype]:
    """``dtype`` / its alias ``torch_dtype``: a ``torch.dtype``, its name (``"float16"``), ``"auto"`` or None."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"give dtype or torch_dtype (its older name), not both (got {dtype} and {torch_dtype})")
    value = dtype if dtype is not None else torch_dtype
    if value is None or value == "auto":
        return None
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        value = getattr(torch, value)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f'dtype must be a floating torch dtype (e.g. torch.float16, "bfloat16") or "auto", got {value!r}'
        )
    return value


def _resolve_device(device, device_map):
    """``device`` / ``device_map`` (single-device forms only): a ``torch.device`` or None."""
    if device_map is None:
        return device
    if device is not None:
        raise ValueError("give device or device_map, not both")
    if isinstance(device_map, dict):
        raise ValueError(
            "device_map as a dict (layers spread over devices) is not supported; give one device: "
            'device_map="cpu", "auto" or "cuda:0"'
        )
    if device_map == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(
            f'device_map must be "cpu", "auto" or a device name like "cuda:0", got {device_map!r}'
        ) from None


def _resolve_path(path: str, cache_dir: Optional[str], revision: Optional[str], local_files_only: bool) -> str:
    """A local directory as is; a Hub model id through huggingface_hub's cache (no network when offline)."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or not _REPO_ID.match(path):
        raise FileNotFoundError(f"{path} is not a directory with a saved model (config.json and {WEIGHTS})")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    offline = bool(local_files_only or constants.HF_HUB_OFFLINE)
    patterns = ["config.json", guard.WEIGHTS, guard.WEIGHTS_INDEX, "*.safetensors", "*.safetensors.index.json"]
    try:
        return snapshot_download(
            path, revision=revision, cache_dir=cache_dir, local_files_only=offline, allow_patterns=patterns
        )
    except LocalEntryNotFoundError:
        where = cache_dir or constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"{path} is neither a local directory nor a model in the Hugging Face cache ({where})"
            + (
                " and downloading is off (HF_HUB_OFFLINE or local_files_only): download it first, or give its directory"
                if offline
                else ": check the name, or give its directory"
            )
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise FileNotFoundError(f"{path}: {str(exc).strip().splitlines()[0]}") from None


def _load_strict(model: PreTrainedModel, state: Dict[str, torch.Tensor], path: str) -> None:
    expected = model.state_dict()
    tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if not (k in tied and tied[k] in state))
    mismatched = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if unexpected or missing or mismatched:
        show = lambda keys: ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")  # noqa
        problems = [
            f"{what}: {show(keys)}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        ]
        raise ValueError(
            f"{path}: the weights do not match the architecture its fnl_config describes ({'; '.join(problems)}); "
            "the checkpoint is incomplete or was saved from a different configuration"
        )
    model.load_state_dict(state, strict=False)  # the tied targets are re-tied below
    if tied:
        model.tie_weights(recompute_mapping=False)
