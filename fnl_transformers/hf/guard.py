"""Patched checkpoints that plain ``transformers`` cannot load wrongly.

A patched model's weights are factors (``U``/``V``) and shrunk projections. Plain ``transformers`` would build the
vanilla architecture and, for every name it does not find, *randomly initialize* the weight with only a logged
report; explicit options (``attn_implementation=``, ``config=``) route around any check in ``config.json`` alone.
:func:`mark_checkpoint` therefore changes a ``save_pretrained`` directory in three ways:

1. **The weights move to** ``fnl_model.safetensors`` (a sharded checkpoint's index to
   ``fnl_model.safetensors.index.json``): no plain-transformers route reads them, so none can load them partially.
2. **config.json names a weights file that is the pointer**: ``transformers_weights`` (the key transformers reads
   to choose the weights file of a directory) holds :data:`POINTER`, which is not a safetensors name, so every
   ``from_pretrained`` that reads this ``config.json`` (``AutoModel*``, the concrete class, ``pipeline``,
   sentence-transformers; with any ``attn_implementation``, ``dtype``/``torch_dtype``, ``device_map``,
   ``use_safetensors``) raises ``ValueError`` ending in the pointer before building anything.
3. **A decoy** ``model.safetensors.index.json`` lists one shard whose file name is the pointer and which does not
   exist, so ``from_pretrained(path, config=<any other config>)`` (which never reads this ``config.json``) raises
   ``FileNotFoundError`` naming it.

``config.json`` also records ``fnl_checkpoint`` (format, weights file). :func:`load_weights` reads both the marked
and the older unmarked layout (``model.safetensors``); :func:`unmark_config` removes the marks from a loaded
config. Everything else in the directory (tokenizer, sentence-transformers files) is untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, List, Tuple

import torch

POINTER = (
    "fnl_transformers checkpoint (factorized weights that plain transformers cannot load): load it with "
    "fnl_transformers.hf.from_pretrained(path), or save fnl_transformers.hf.recompose(model) for plain "
    "transformers"
)
TRAP_KEY = "transformers_weights"  # config key transformers reads for the weights file name
GUARD_KEY = "fnl_checkpoint"
FORMAT = 1
WEIGHTS = "fnl_model.safetensors"
WEIGHTS_INDEX = "fnl_model.safetensors.index.json"
PLAIN_WEIGHTS = "model.safetensors"
PLAIN_INDEX = "model.safetensors.index.json"
# a file name (no path separators or colons) that is the pointer: the decoy index lists it, nothing creates it
DECOY_SHARD = POINTER.replace(":", " -").replace("/", " ") + ".safetensors"


def _config_path(save_dir: str) -> str:
    path = os.path.join(save_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{save_dir} has no config.json; is it a save_pretrained directory?")
    return path


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupted: save it again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object; the checkpoint is corrupted: save it again")
    return data


def _write_json(path: str, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".fnl-", suffix=".json", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _is_decoy(index_path: str) -> bool:
    try:
        return _read_json(index_path).get("metadata", {}).get("fnl_transformers") == POINTER
    except ValueError:
        return False


def is_marked(save_dir: str) -> bool:
    """Whether ``save_dir`` was marked by :func:`mark_checkpoint` (its ``config.json`` carries the marks)."""
    config = _read_json(_config_path(os.fspath(save_dir)))
    return isinstance(config.get(GUARD_KEY), dict) and config.get(TRAP_KEY) == POINTER


def mark_checkpoint(save_dir: str) -> None:
    """Make the ``save_pretrained`` directory ``save_dir`` of a patched model unloadable by plain transformers
    (see the module docstring). Idempotent; run it after every ``save_pretrained`` of a patched model."""
    save_dir = os.fspath(save_dir)
    config_path = _config_path(save_dir)
    config = _read_json(config_path)
    single, index = os.path.join(save_dir, PLAIN_WEIGHTS), os.path.join(save_dir, PLAIN_INDEX)
    if os.path.isfile(single):
        os.replace(single, os.path.join(save_dir, WEIGHTS))
        weights = WEIGHTS
    elif os.path.isfile(index) and not _is_decoy(index):
        os.replace(index, os.path.join(save_dir, WEIGHTS_INDEX))
        weights = WEIGHTS_INDEX
    elif os.path.isfile(os.path.join(save_dir, WEIGHTS)):
        weights = WEIGHTS
    elif os.path.isfile(os.path.join(save_dir, WEIGHTS_INDEX)):
        weights = WEIGHTS_INDEX
    else:
        other = [n for n in sorted(os.listdir(save_dir)) if n.endswith((".bin", ".pt", ".pth"))]
        raise FileNotFoundError(
            f"{save_dir} has no {PLAIN_WEIGHTS} (or sharded {PLAIN_INDEX}) to protect"
            + (f" ({', '.join(other)} found: save with safetensors, the default)" if other else "")
        )
    _write_json(index, {"metadata": {"fnl_transformers": POINTER}, "weight_map": {"fnl_transformers": DECOY_SHARD}})
    config[TRAP_KEY] = POINTER
    config[GUARD_KEY] = {"format": FORMAT, "weights": weights}
    _write_json(config_path, config)


def unmark_config(config) -> None:
    """Remove the marks from a config loaded from a marked directory (a ``PretrainedConfig`` or a dict), so the
    model built from it saves and loads normally."""
    store = config if isinstance(config, dict) else config.__dict__
    if store.get(TRAP_KEY) == POINTER:
        store.pop(TRAP_KEY)
    store.pop(GUARD_KEY, None)


def weight_files(save_dir: str) -> List[str]:
    """The safetensors files holding the weights of a marked or unmarked ``save_pretrained`` directory."""
    save_dir = os.fspath(save_dir)
    for single, index in ((WEIGHTS, WEIGHTS_INDEX), (PLAIN_WEIGHTS, PLAIN_INDEX)):
        if os.path.isfile(os.path.join(save_dir, single)):
            return [os.path.join(save_dir, single)]
        path = os.path.join(save_dir, index)
        if os.path.isfile(path) and not _is_decoy(path):
            weight_map = _read_json(path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{path} has no weight_map; the checkpoint is corrupted: save it again")
            files = [os.path.join(save_dir, name) for name in sorted(set(weight_map.values()))]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise FileNotFoundError(f"{path} lists {missing[0]}, which is missing; the checkpoint is incomplete")
            return files
    raise FileNotFoundError(
        f"{save_dir} has no {WEIGHTS} or {PLAIN_WEIGHTS} (or a sharded index); save the model with save_pretrained"
    )


def load_weights(save_dir: str) -> Dict[str, torch.Tensor]:
    """All tensors of a marked or unmarked directory; a file that is not valid safetensors is one error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: Dict[str, torch.Tensor] = {}
    for path in weight_files(save_dir):
        try:
            state.update(load_file(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"{path} is not a readable safetensors file ({reason}); the checkpoint is corrupted or "
                "incomplete: save it again"
            ) from None
    return state


def read_checkpoint(save_dir: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """``(config.json without the marks, all weights)`` of a marked or unmarked directory."""
    config = _read_json(_config_path(os.fspath(save_dir)))
    unmark_config(config)
    return config, load_weights(save_dir)
