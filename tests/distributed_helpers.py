"""Shared by the multi-process tests: a free port, launching a worker script (alone or under ``torchrun``) and
reading what it saved, and a guard that makes every torch.distributed collective but ``all_reduce`` raise."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# every collective of torch.distributed that would move a factor (or any other tensor) but all_reduce
FORBIDDEN_COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "gather",
    "scatter",
)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_worker(cmd, out, weights_only: bool = True):
    """Run ``cmd`` from the repository root (one thread per process) and load the file ``out`` it wrote."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return torch.load(out, weights_only=weights_only)


def torchrun_worker(script: str, out, *args: str, weights_only: bool = True):
    """``script --out OUT ARGS`` as 2 processes under ``torchrun`` (local rendezvous on a free port)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        script,
        "--out",
        str(out),
        *args,
    ]
    return run_worker(cmd, out, weights_only)


@contextlib.contextmanager
def forbid_collectives(who: str):
    """While inside, every collective of :data:`FORBIDDEN_COLLECTIVES` raises, naming ``who`` called it."""

    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"{who} called torch.distributed.{name}")

        return call

    saved = {name: getattr(dist, name) for name in FORBIDDEN_COLLECTIVES}
    for name in FORBIDDEN_COLLECTIVES:
        setattr(dist, name, refuse(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
