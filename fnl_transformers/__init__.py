"""fnl_transformers: spectral initialization and Frobenius decay for factorized layers and attention.

Khodak, Tenenholtz, Mackey, Fusi, "Initialization and Regularization of Factorized Neural Layers", ICLR 2021.
The core's names (:mod:`fnl_transformers.core`) are available here and import torch on first use; the fairseq
plugin (``fnl_transformers.fairseq_plugin``) and the HuggingFace patchers (``fnl_transformers.hf``) are imported
on demand.
"""

from . import core

__all__ = list(core.__all__)
__version__ = "0.1.0"


def __getattr__(name):
    if name in core.__all__:
        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
