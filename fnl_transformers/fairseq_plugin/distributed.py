"""Multi-process ``fairseq-train`` with the plugin: ``torchrun`` launch, and the DDP backends the plugin supports.

**Launch.** ``torchrun`` starts one process per rank and gives each ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. Stock fairseq 0.12 reads them only when ``--distributed-world-size`` is
above 1, and its default is the number of visible GPUs: on CPU, or on nodes with one GPU each, every process
then silently trains alone (all of them writing the same ``--save-dir``); with ``--distributed-world-size N`` on
CPU it fails computing the device as ``RANK % torch.cuda.device_count()`` (a division by zero). Likewise an
explicit ``--distributed-init-method`` without ``--distributed-no-spawn`` spawns one process per visible GPU,
which on CPU is zero processes: the command exits 0 having trained nothing.

:func:`resolve_launch` runs before fairseq's ``call_main`` and its own inference (:mod:`.launch`):

* under ``torchrun`` (all five variables set, ``WORLD_SIZE > 1``) and without ``--distributed-init-method``:
  ``env://`` initialization, world size ``WORLD_SIZE``, rank ``RANK``, device ``LOCAL_RANK``, no spawning (the
  processes exist). A ``--distributed-world-size`` that is neither fairseq's default nor ``WORLD_SIZE`` is
  refused. Multi-node: the same command on every node with ``torchrun --nnodes``/``--node-rank`` and
  ``--master-addr``/``--master-port`` (or ``--rdzv-backend c10d --rdzv-endpoint``);
* a launch that would spawn no process (no GPU visible, no ``--distributed-no-spawn``) is refused with the fix;
* everything else (single process, Slurm, explicit ranks) is left to fairseq unchanged.

**Backends.** :func:`check_backends` runs in the same place (:mod:`.launch`), before any process group or model exists:

* CPU workers (``--cpu``, or no GPU) need ``--distributed-backend gloo --ddp-backend legacy_ddp``: fairseq's
  defaults are GPU-only (``nccl``; ``pytorch_ddp`` hands ``DistributedDataParallel`` a GPU device id, which it
  rejects for a CPU module), and so is ``fully_sharded`` (fairscale's FSDP computes on CUDA). Refused with
  that fix.
* ``--ddp-backend fully_sharded`` (fairscale's FSDP) turns the parameters of each wrapped module into slices of
  one flat sharded buffer, materialized only inside that module's forward. The plugin's factorized forms are
  views of the named parameters (``q_proj.weight``, ``fc1.U``, ...) and its optimizers group parameters by their
  per-parameter settings, so FD (``--fd-*``, in the loss or, with ``--fd-mode decoupled``, in the optimizer),
  ``--form-diagnostics-interval`` and ``--no-decay-bias-norm`` are refused there, naming the backends that keep
  whole parameters on every worker (``pytorch_ddp`` on GPUs, ``legacy_ddp`` anywhere). The check runs before
  fairseq imports fairscale, so the refusal comes first, not an ImportError. Factorized layers, SI and reduced
  heads without those options are not refused: they only change the module tree before fairseq wraps it
  (untested: fairscale's FSDP needs CUDA).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..core import KINDS

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
GPU_ONLY_DDP_BACKENDS = ("pytorch_ddp", "c10d")  # c10d: fairseq's alias of pytorch_ddp


def torchrun_env(environ=None) -> Optional[dict]:
    """``{rank, world_size, local_rank}`` when this process was started by ``torchrun`` (or
    ``torch.distributed.launch``) for more than one rank, else None."""
    environ = os.environ if environ is None else environ
    if not all(k in environ for k in TORCHRUN_VARS):
        return None
    world = int(environ["WORLD_SIZE"])
    if world <= 1:
        return None
    return {"rank": int(environ["RANK"]), "world_size": world, "local_rank": int(environ["LOCAL_RANK"])}


def _visible_gpus(cpu: bool) -> int:
    return 0 if cpu else torch.cuda.device_count()


def resolve_launch(dist_cfg, cpu: bool = False, environ=None) -> None:
    """Complete fairseq's ``distributed_training`` config for a ``torchrun`` launch (in place), or raise a
    one-line ``ValueError`` for a launch that cannot work (see the module docstring)."""
    run = torchrun_env(environ)
    pipeline = bool(getattr(dist_cfg, "pipeline_model_parallel", False))
    if (
        run is not None
        and dist_cfg.distributed_init_method is None
        and not getattr(dist_cfg, "tpu", False)
        and not pipeline
    ):
        default = max(1, torch.cuda.device_count())  # fairseq's default --distributed-world-size
        given = dist_cfg.distributed_world_size
        if given not in (default, run["world_size"]):
            raise ValueError(
                f"--distributed-world-size {given} but torchrun started WORLD_SIZE={run['world_size']} processes: "
                "drop --distributed-world-size (the processes torchrun starts are the world) or launch "
                f"{given} of them (torchrun --nnodes x --nproc-per-node)"
            )
        dist_cfg.distributed_init_method = "env://"
        dist_cfg.distributed_world_size = run["world_size"]
        dist_cfg.distributed_rank = run["rank"]
        dist_cfg.device_id = run["local_rank"]
        dist_cfg.distributed_no_spawn = True
        return
    if (
        dist_cfg.distributed_init_method is not None
        and not dist_cfg.distributed_no_spawn
        and not pipeline
        and dist_cfg.distributed_world_size > 1
        and _visible_gpus(cpu) == 0
    ):
        raise ValueError(
            f"--distributed-init-method {dist_cfg.distributed_init_method} spawns one process per visible GPU and "
            "there is none: launch one process per rank with `torchrun --nproc-per-node N fairseq-train ...`, or "
            "add --distributed-no-spawn and start each rank with its --distributed-rank"
        )


def _named_parameter_options(args) -> list:
    """The options set in ``args`` that need the model's named, whole parameters (FD and the per-parameter
    optimizer groups)."""
    used = []
    for kind in KINDS:
        value = getattr(args, f"fd_{kind}", None)
        if value is not None and float(value) > 0:
            used.append(f"--fd-{kind}")
    if (getattr(args, "form_diagnostics_interval", 0) or 0) > 0:
        used.append("--form-diagnostics-interval")
    if getattr(args, "no_decay_bias_norm", False):
        used.append("--no-decay-bias-norm")
    return used


def check_backends(cfg) -> None:
    """One-line ``ValueError`` for a DDP / process-group backend that cannot run this training (see the module
    docstring). ``cfg``: fairseq's config after :func:`resolve_launch`."""
    dist_cfg = cfg.distributed_training
    if dist_cfg.ddp_backend == "fully_sharded":
        used = _named_parameter_options(getattr(cfg, "model", None))
        if used:
            raise ValueError(
                f"--ddp-backend fully_sharded keeps parameters as slices of one flat sharded buffer, which "
                f"{', '.join(used)} cannot read (factorized forms and optimizer groups are views of the named "
                "parameters): use --ddp-backend pytorch_ddp (GPUs) or legacy_ddp (CPU or GPU)"
            )
    cpu = bool(getattr(cfg.common, "cpu", False)) or not torch.cuda.is_available()
    distributed = dist_cfg.distributed_init_method is not None and dist_cfg.distributed_world_size > 1
    if cpu and not getattr(cfg.common, "tpu", False) and (distributed or dist_cfg.ddp_backend == "fully_sharded"):
        wrong = []
        if distributed and dist_cfg.distributed_backend == "nccl":
            wrong.append("--distributed-backend nccl")
        if dist_cfg.ddp_backend in GPU_ONLY_DDP_BACKENDS + ("fully_sharded",):
            wrong.append(f"--ddp-backend {dist_cfg.ddp_backend}")
        if wrong:
            raise ValueError(
                f"{' and '.join(wrong)} need{'s' if len(wrong) == 1 else ''} GPUs and these workers run on CPU: use "
                "--distributed-backend gloo --ddp-backend legacy_ddp"
            )
