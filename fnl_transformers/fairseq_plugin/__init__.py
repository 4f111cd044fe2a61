"""fairseq plugin of fnl_transformers: ``fairseq-train --user-dir "$(fnl userdir)" --arch fnl_transformer_* ...``.

Importing this package (which imports fairseq) registers, once per process:

* the model ``fnl_transformer`` (with the fnl options, FD included, as model flags) and architectures
  ``fnl_transformer`` (base dims), ``fnl_transformer_iwslt_de_en``,
  ``fnl_transformer_wmt_en_de``, ``fnl_transformer_tiny`` (:mod:`.model`, reduced heads in :mod:`.attention`);
* the criterion ``fd_label_smoothed_cross_entropy`` (:mod:`.criterion`);
* the optimizers ``fnl_adam``, ``flambe``, ``fnl_lamb`` (:mod:`.optim`);
* the safe-loading allow-list for fairseq checkpoints under torch >= 2.6 (:mod:`.safe_loading`);
* ``torchrun`` launch (``env://``) of ``fairseq-train`` on CPU and GPU (:mod:`.distributed`, run before training
  by :mod:`.launch`);
* mixed precision (``--fp16``, ``--bf16``, ``--memory-efficient-fp16/-bf16``, ``--amp``) that keeps the plugin
  optimizers' per-parameter groups (:mod:`.precision`).

Registration is idempotent and independent of import order: :func:`register` skips names already in fairseq's
registries, so a second import under another name (``--user-dir`` imports its folder as a top-level module),
spawned distributed workers, or ``import fnl_transformers`` before fairseq never raise "Cannot register
duplicate". ``fnl userdir`` prints ``user_dir/fnl_fairseq_plugin``, a shim package whose only content is
``import fnl_transformers.fairseq_plugin``: its basename is unique, and it works from any working directory.
"""

from __future__ import annotations

from . import launch, precision, safe_loading
from .criterion import FDLabelSmoothedCrossEntropyConfig, FDLabelSmoothedCrossEntropyCriterion
from .model import ARCHITECTURES, FnlTransformerModel, fnl_specs
from .optim import OPTIMIZERS

MODEL_NAME = "fnl_transformer"
CRITERION_NAME = "fd_label_smoothed_cross_entropy"


def register() -> None:
    """Register the plugin's model, architectures, criterion and optimizers with fairseq (idempotent)."""
    from fairseq.criterions import CRITERION_REGISTRY, register_criterion
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY, register_model, register_model_architecture
    from fairseq.optim import OPTIMIZER_REGISTRY, register_optimizer

    if MODEL_NAME not in MODEL_REGISTRY:
        register_model(MODEL_NAME)(FnlTransformerModel)
    for arch, fn in ARCHITECTURES.items():
        if arch not in ARCH_MODEL_REGISTRY:
            register_model_architecture(MODEL_NAME, arch)(fn)
    if CRITERION_NAME not in CRITERION_REGISTRY:
        register_criterion(CRITERION_NAME, dataclass=FDLabelSmoothedCrossEntropyConfig)(
            FDLabelSmoothedCrossEntropyCriterion
        )
    for name, (cls, config) in OPTIMIZERS.items():
        if name not in OPTIMIZER_REGISTRY:
            register_optimizer(name, dataclass=config)(cls)


safe_loading.install()
launch.install()
precision.install()
register()

__all__ = ["FDLabelSmoothedCrossEntropyCriterion", "FnlTransformerModel", "fnl_specs", "register"]
