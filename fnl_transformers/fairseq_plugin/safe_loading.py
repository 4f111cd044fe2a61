"""Safe loading of fairseq checkpoints under torch >= 2.6 (``torch.load(..., weights_only=True)``).

torch 2.6 made ``weights_only=True`` the default of ``torch.load``: the unpickler then rebuilds only tensors,
containers and primitive values plus an allow-list of globals. Every fairseq checkpoint holds a few other
objects, so stock ``fairseq-generate``, ``fairseq-interactive``, the hub ``from_pretrained`` and resuming
``fairseq-train`` fail with ``Unsupported global: argparse.Namespace``. The fix is NOT to turn safe loading off
(a checkpoint is a pickle: a malicious one runs any command on load) but to allow exactly what fairseq
checkpoints contain. :func:`install` (called when the plugin is imported; idempotent) does three things:

1. ``torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)``. The list was measured with
   ``torch.serialization.get_unsafe_globals_in_checkpoint`` on checkpoints that fairseq-fixed 0.12.3.1
   writes for the stock ``transformer`` and for ``fnl_transformer`` with the optimizers nag, sgd, adam,
   adafactor, flambe and our LAMB, the lr schedulers fixed, inverse_sqrt, polynomial_decay, cosine,
   tri_stage and reduce_lr_on_plateau, ``--memory-efficient-fp16``, ``--store-ema``, ``--eval-bleu``, and
   2-worker runs (tests/test_fairseq_safety.py re-measures a set of these):

   * ``argparse.Namespace``: ``cfg["model"]`` of every model built through the legacy ``add_args`` route
     (``transformer``, ``fnl_transformer``) and ``state["args"]`` of checkpoints written by fairseq < 0.10.
   * ``numpy.ndarray``, ``numpy.dtype``, the class of the integer dtype (``numpy.dtypes.Int64DType``; also
     the platform's default integer dtype class where that differs) and ``numpy.core.multiarray._reconstruct``
     (spelt ``numpy._core.multiarray._reconstruct`` by numpy >= 2; both names are allowed so checkpoints move
     between numpy versions): ``--eval-bleu`` logs the BLEU n-gram counts as numpy integer arrays, and fairseq
     saves all meters in ``extra_state["metrics"]``. Rebuilding such an array needs exactly these; the
     elements of an object array would go through the same restricted unpickler.

   Optimizer and lr-scheduler states, fp16 loss scales, EMA weights and the meters are tensors, dicts,
   lists, tuples, ``OrderedDict`` and numbers, which torch allows by default.

2. fairseq's own checkpoint reads (``fairseq.checkpoint_utils``: ``load_checkpoint_to_cpu``, used by
   fairseq-generate/-interactive/-train/hub, and ``load_ema_from_checkpoint``) call ``torch.load`` without
   ``weights_only``, i.e. they follow torch's default, which is ``False`` before torch 2.6 and under
   ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``. Their ``torch`` is replaced by :class:`_SafeTorch`, which forwards
   everything to torch but makes ``load`` always pass ``weights_only=True``.

3. Distributed resume: rank 0 reads the checkpoint (safely, as above) and ``fairseq.distributed.utils``
   broadcasts the loaded state to the other ranks as a ``torch.save`` buffer that it reads back with a bare
   ``torch.load``. That buffer is not a user's file, but by then ``state["cfg"]`` is an OmegaConf
   ``DictConfig``; rather than allow-listing OmegaConf for every load in the process, that one call site
   loads with ``weights_only=True`` and OmegaConf's classes allowed only for its duration
   (``torch.serialization.safe_globals``), see :func:`broadcast_globals`.

A file that needs anything else is refused before any of its code runs, with :class:`UnsafeCheckpointError`
naming the file and the offending global.
"""

from __future__ import annotations

import argparse
import pickle
import re
import types
import warnings
from typing import Any, List

import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs a global outside the fairseq allow-list (it would run code fairseq never needs)."""


def _numpy_globals() -> List[Any]:
    import numpy as np

    try:  # numpy >= 2 keeps the implementation in numpy._core; pickles name the module they were made with
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    # the class of the arrays' dtype (numpy.dtypes.Int64DType: np.array of Python ints) is rebuilt too
    int_dtypes = {type(np.dtype(np.int64)), type(np.array([0]).dtype)}  # the latter: int32 on numpy 1/Windows
    return [
        np.ndarray,
        np.dtype,
        *sorted(int_dtypes, key=str),
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
    ]


def fairseq_checkpoint_globals() -> List[Any]:
    """The globals fairseq checkpoints contain (see the module docstring for where each comes from)."""
    return [argparse.Namespace, *_numpy_globals()]


def broadcast_globals() -> List[Any]:
    """Globals of the state that fairseq broadcasts from rank 0 on distributed resume (measured): the
    checkpoint's own, fairseq's tensor placeholder, and the OmegaConf ``DictConfig`` that
    ``load_checkpoint_to_cpu`` makes of ``state["cfg"]`` (its nodes, metadata and the types they name)."""
    import collections
    import typing

    from fairseq.distributed.utils import _TensorPlaceholder
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    return fairseq_checkpoint_globals() + [
        _TensorPlaceholder,
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        typing.Any,
        collections.defaultdict,
        dict,
        list,
        int,
    ]


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _describe(f) -> str:
    name = getattr(f, "name", f)
    return repr(str(name)) if isinstance(name, (str, bytes)) or hasattr(name, "__fspath__") else "checkpoint"


def safe_load(f, *args, **kwargs):
    """``torch.load(f, ..., weights_only=True)``; a refused file raises :class:`UnsafeCheckpointError`."""
    if kwargs.pop("weights_only", None) is False:
        warnings.warn(
            "fnl_transformers safe loading: ignoring weights_only=False for a fairseq checkpoint", stacklevel=2
        )
    if "pickle_module" in kwargs:
        raise ValueError("safe loading of fairseq checkpoints does not take a pickle_module")
    try:
        return torch.load(f, *args, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL_RE.findall(str(exc))
        if found:
            raise UnsafeCheckpointError(
                f"refusing to load {_describe(f)}: it needs {', '.join(sorted(set(found)))}, which fairseq "
                "checkpoints never contain (loading it could run arbitrary code). If you wrote this file and "
                "trust it, allow that class yourself with torch.serialization.add_safe_globals([...]) after "
                "importing the plugin; otherwise do not use it."
            ) from exc
        raise UnsafeCheckpointError(
            f"could not load {_describe(f)} safely (weights_only=True): "
            f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
        ) from exc


class _SafeTorch(types.ModuleType):
    """Stands in for ``torch`` in one fairseq module: every attribute is torch's, except ``load``."""

    def __init__(self, load):
        super().__init__("torch", "torch, with load() forced to weights_only=True (fnl_transformers)")
        self._fnl_load = load

    def __getattr__(self, name):
        return getattr(torch, name)

    def load(self, f, *args, **kwargs):
        return self._fnl_load(f, *args, **kwargs)


def _broadcast_load(f, *args, **kwargs):
    with torch.serialization.safe_globals(broadcast_globals()):
        return safe_load(f, *args, **kwargs)


_INSTALLED = False


def install() -> None:
    """Allow-list fairseq's checkpoint globals and force ``weights_only=True`` where fairseq loads checkpoints.

    Idempotent; imports fairseq (call it only from the plugin). On torch < 2.4 (no allow-list API) it warns and
    leaves fairseq unchanged."""
    global _INSTALLED
    if _INSTALLED:
        return
    if not hasattr(torch.serialization, "add_safe_globals"):
        warnings.warn(
            f"torch {torch.__version__} cannot allow-list globals (torch >= 2.4 can); fairseq checkpoints load "
            "with torch's default, which executes pickled code: use torch >= 2.6 for safe loading",
            stacklevel=2,
        )
        _INSTALLED = True
        return
    torch.serialization.add_safe_globals(fairseq_checkpoint_globals())
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    if not isinstance(checkpoint_utils.torch, _SafeTorch):
        checkpoint_utils.torch = _SafeTorch(safe_load)
    if not isinstance(distributed_utils.torch, _SafeTorch):
        distributed_utils.torch = _SafeTorch(_broadcast_load)
    _INSTALLED = True
