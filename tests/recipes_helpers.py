"""Helpers for the recipe tests: run a recipe script, read its results, check a PNG.

* ``REPO``, ``RECIPES``: repository and ``recipes/`` paths.
* ``run_script(path, *args, cwd=None, timeout=3600) -> CompletedProcess``: a recipe script run with this
  interpreter's environment first on PATH and ``OMP_NUM_THREADS=1`` whatever the caller's setting (the tests'
  tiny models gain nothing from more threads, and on a busy 2-core machine OpenMP threads spin-wait: with 2 the
  demo ran past 15 minutes under load); stdout and stderr captured as text. The timeout only guards against a
  hang (the demo took 4 to 12 minutes on 2 cores at load averages 5 to 9).
* ``last_line(text) -> str``: the last non-empty line (the recipes' one-line errors).
* ``load_json(path)``, ``is_png(path)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "recipes")


def run_script(path: str, *args: str, cwd: str = None, timeout: int = 3600, env_extra: dict = None):
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHON"] = sys.executable
    env["OMP_NUM_THREADS"] = "1"
    env.update(env_extra or {})
    return subprocess.run(
        ["bash", path, *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000
