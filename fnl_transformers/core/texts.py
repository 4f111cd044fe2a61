"""Texts for calibration and evaluation (torch-free, so the ``fnl`` command checks a text file before the heavy
imports): one rule for a list of texts and one for a text file of one text per line."""

from __future__ import annotations

import os
from typing import Iterable, List


def check_texts(texts: Iterable[str], what: str = "calibration texts") -> List[str]:
    """A non-empty list of non-blank strings (blank lines are dropped), else one clear error."""
    if isinstance(texts, str):
        raise ValueError(f"{what} must be a list of strings (one text each), got a single string")
    try:
        items = list(texts)
    except TypeError:
        raise ValueError(f"{what} must be a list of strings, got {type(texts).__name__}") from None
    bad = [type(t).__name__ for t in items if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{what} must be strings, got {bad[0]}")
    items = [t for t in items if t.strip()]
    if not items:
        raise ValueError(f"{what}: no non-empty text given")
    return items


def read_texts(path: str, what: str = "calibration file") -> List[str]:
    """The non-empty lines of a UTF-8 text file (one text per line); ``what`` names the file in errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} is not a file; give a UTF-8 text file with one text per line")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text; give a text file with one text per line") from None
    return check_texts(lines, f"{what} {path}")


__all__ = ["check_texts", "read_texts"]
