"""What the plugin settles in fairseq's config before ``fairseq-train`` starts training: :func:`install` (called
when the plugin is imported; idempotent) wraps fairseq's ``call_main`` once, and the wrapper runs, in this order,

1. :func:`.precision.resolve_bf16` (``--bf16`` without ``torch_xla`` off fairseq's TPU path);
2. :func:`.distributed.resolve_launch` (``torchrun`` / ``env://`` launch, launches that would spawn no process);
3. :func:`.distributed.check_backends` (backends that cannot run, ``fully_sharded`` with FD);

then fairseq's own ``call_main``, before any process group or model exists.
"""

from __future__ import annotations

from .distributed import check_backends, resolve_launch
from .precision import resolve_bf16

_INSTALLED = False


def settle(cfg) -> None:
    """The steps of the module docstring on fairseq's config ``cfg`` (in place)."""
    resolve_bf16(cfg)
    resolve_launch(cfg.distributed_training, cpu=bool(getattr(cfg.common, "cpu", False)))
    check_backends(cfg)


def install() -> None:
    """Run :func:`settle` before fairseq's ``call_main`` (idempotent; imports fairseq)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from fairseq.distributed import utils as distributed_utils

    stock = distributed_utils.call_main

    def call_main(cfg, main, **kwargs):
        settle(cfg)
        return stock(cfg, main, **kwargs)

    call_main.__wrapped__ = stock
    call_main.__doc__ = stock.__doc__
    distributed_utils.call_main = call_main
    _INSTALLED = True
