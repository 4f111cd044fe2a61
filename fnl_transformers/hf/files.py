"""Carrying a model directory's other files (tokenizer, sentence-transformers modules, model card) to a new save.

``save_pretrained`` writes only ``config.json``, ``generation_config.json`` and the weights. A model directory
usually holds more that users load it with: tokenizer files, and for sentence-transformers ``modules.json``,
``config_sentence_transformers.json``, ``sentence_bert_config.json`` and module folders such as ``1_Pooling/``.
:func:`copy_non_weight_files` copies all of those, and never the weights of the source model in any format
(copying them would put stale dense weights beside the new ones).
"""

from __future__ import annotations

import os
import shutil
from typing import List, Tuple

# files of weights in any format (and their shard indexes); OpenVINO's .xml graph goes with a same-named .bin
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".onnx_data",
    ".ot",
    ".gguf",
    ".tflite",
    ".npz",
    ".mlmodel",
    ".safetensors.index.json",
    ".bin.index.json",
)
WRITTEN_BY_SAVE = ("config.json", "generation_config.json")  # save_pretrained writes these for the new model


def is_weight_file(path: str) -> bool:
    name = os.path.basename(path)
    if name.endswith(WEIGHT_SUFFIXES):
        return True
    stem, ext = os.path.splitext(path)
    return ext == ".xml" and os.path.isfile(stem + ".bin")


def copy_non_weight_files(src: str, dst: str) -> Tuple[List[str], List[str]]:
    """Copy every file of ``src`` (recursively) into ``dst`` except weights (:data:`WEIGHT_SUFFIXES`), the files
    ``save_pretrained`` writes at the top level (:data:`WRITTEN_BY_SAVE`) and hidden entries (``.git``, ``.cache``).
    Existing files of ``dst`` are kept. Returns ``(copied, skipped weight files)`` as paths relative to ``src``."""
    copied, skipped = [], []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = os.path.relpath(root, src)
        for name in sorted(files):
            rel = os.path.normpath(os.path.join(rel_root, name))
            path = os.path.join(root, name)
            if name.startswith(".") or (rel_root == "." and name in WRITTEN_BY_SAVE):
                continue
            if is_weight_file(path):
                skipped.append(rel)
                continue
            target = os.path.join(dst, rel)
            if os.path.exists(target):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(path, target)
            copied.append(rel)
    return copied, skipped
