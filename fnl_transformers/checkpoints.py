"""Checkpoint files checked without loading them: is this a PyTorch file, and is it a fairseq checkpoint?

``fnl recompose`` and ``recipes/iwslt14/eval.sh`` check their checkpoint here first: in a fraction of a second,
without importing torch or fairseq, and with one clear line instead of fairseq failing deep inside (``KeyError:
'best_loss'``) or ``torch.load`` reporting a pickle opcode. Reading the structure never runs the file's code: the
pickle is read by an unpickler that resolves every global to an inert placeholder and skips tensor storages, so
only the containers and plain values (the top-level keys) come out.

``python -m fnl_transformers.checkpoints fairseq CHECKPOINT`` exits 2 with ``PROG: error: ...`` (``PROG`` from
``$FNL_PROG``) when the file is not a fairseq checkpoint.
"""

from __future__ import annotations

import os
import pickle
import sys
import zipfile
from typing import Any, List, Optional

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_HINT = "give a checkpoint_*.pt written by fairseq-train (e.g. checkpoints/checkpoint_best.pt)"


class _Inert:
    """Stands in for every global of the pickle: accepts any construction and state, holds nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _StructureUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _Inert

    def persistent_load(self, pid):  # tensor storages
        return None


def _kind(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] == b"PK\x03\x04" or zipfile.is_zipfile(path):  # a zip archive (perhaps truncated)
        return "zip"
    if head[:1] == b"\x80":  # a pickle (torch's legacy format starts with the pickled magic number)
        return "pickle"
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "binary"


def check_file(path: str, what: str = "checkpoint") -> str:
    """One clear error unless ``path`` is an existing file in a PyTorch format; returns ``"zip"`` or ``"pickle"``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is a directory, not a {what} file; {_HINT}")
    kind = _kind(path)
    if kind == "text":
        raise ValueError(f"{path} is a text file, not a PyTorch {what}; {_HINT}")
    if kind == "binary":
        raise ValueError(f"{path} is not a PyTorch {what} (neither torch.save's zip format nor a pickle); {_HINT}")
    return kind


def read_structure(path: str) -> Any:
    """The object saved in a PyTorch file, with every class instance replaced by an inert placeholder and no tensor
    data (dicts, lists, strings and numbers come out as they are)."""
    kind = check_file(path)
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                if not names:
                    raise ValueError("no data.pkl in the archive")
                with archive.open(names[0]) as f:
                    return _StructureUnpickler(f).load()
        with open(path, "rb") as f:  # legacy format: magic number, protocol, system info, then the object
            if _StructureUnpickler(f).load() != _LEGACY_MAGIC:
                raise ValueError("a pickle, but not one torch.save wrote (no magic number)")
            for _ in range(2):
                _StructureUnpickler(f).load()
            return _StructureUnpickler(f).load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
        IndexError,
        KeyError,
        AttributeError,
        TypeError,
    ) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint ({reason}): the file is truncated or corrupted"
        ) from None


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = [repr(k) for k in list(obj)[:6]]
        return "a dict with keys " + ", ".join(keys) + (", ..." if len(obj) > 6 else "") if obj else "an empty dict"
    if isinstance(obj, _Inert):
        return "an object (a bare state dict or module?)"
    return f"a {type(obj).__name__}"


def check_fairseq_checkpoint(path: str) -> List[str]:
    """One clear error unless ``path`` is a fairseq checkpoint (a dict with ``model`` and ``cfg`` or ``args``);
    returns its top-level keys."""
    state = read_structure(path)
    if not isinstance(state, dict) or "model" not in state or not ("cfg" in state or "args" in state):
        raise ValueError(
            f"{path} is a PyTorch file but not a fairseq checkpoint: it holds {_describe(state)}, a "
            f"fairseq checkpoint has 'model' and 'cfg' (or 'args'); {_HINT}"
        )
    return [k for k in state if isinstance(k, str)]


def check_output(src: str, dst: str, overwrite: bool) -> None:
    """The output of a conversion must be a new file (or ``overwrite``), never the input."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("the output must be a new file, not the input checkpoint")
    if os.path.isdir(dst):
        raise ValueError(f"{dst} is a directory; give the output file name (e.g. {os.path.join(dst, 'model.pt')})")
    if os.path.exists(dst) and not overwrite:
        raise ValueError(f"{dst} already exists (possibly from an earlier run); remove it or pass --force")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = os.environ.get("FNL_PROG", "python -m fnl_transformers.checkpoints")
    if len(argv) != 2 or argv[0] != "fairseq":
        print(f"usage: {prog} fairseq CHECKPOINT", file=sys.stderr)
        return 2
    try:
        check_fairseq_checkpoint(argv[1])
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
