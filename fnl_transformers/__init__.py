"""fnl_transformers: spectral initialization and Frobenius decay for factorized layers and attention.

Khodak, Tenenholtz, Mackey, Fusi, "Initialization and Regularization of Factorized Neural Layers", ICLR 2021.
Importing this package imports torch only; the fairseq plugin (``fnl_transformers.fairseq_plugin``) and the
HuggingFace patchers (``fnl_transformers.hf``) are imported on demand.
"""
from . import core
from .core import *  # noqa: F401,F403

__all__ = list(core.__all__)
__version__ = "0.1.0"
