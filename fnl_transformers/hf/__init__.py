"""HuggingFace integration: factorize a ``transformers`` model before training, reload it, recompose it.

Importing this package imports ``transformers`` (``import fnl_transformers`` alone never does)::

    from fnl_transformers.hf import FNLConfig, patch_model, from_pretrained, recompose

    model = patch_model(model, FNLConfig(rank_scale=0.5, head_dim=16, fd_qk=1e-4, fd_ov=1e-4))
    model.save_pretrained(out)            # stores the plan in config.json
    model = from_pretrained(out)          # rebuilds and loads strictly
    print_parameter_summary(model)        # trainable / factorized / attention parameters, vs. the original
    vanilla = recompose(model)            # plain architecture, same outputs
    trainer = FNLTrainer(model=model, args=training_args, train_dataset=ds)  # FD once per update

Modules: ``config`` (FNLConfig, the converter to the core settings), ``arch`` (per-architecture names and
layouts), ``plan`` (typed plan records, computed from shapes), ``apply`` (patch_model, apply_plan), ``recompose``,
``persist`` (plan in config.json, from_pretrained), ``layers`` (padded projections, tied factorized head),
``trainer`` (FNLTrainer), ``loss_scaling`` (gradient-accumulation loss fix), ``report`` (per-layer table),
``guard`` (checkpoints plain transformers cannot misload), ``calibration`` (layer input statistics from text),
``fidelity`` (output-level comparison of two models on text), ``files`` (carrying a directory's other files),
``summary`` (parameter summary).
"""

from .apply import patch_model
from .config import FNLConfig
from .persist import from_pretrained, get_fnl_config, is_patched
from .recompose import recompose
from .summary import parameter_summary, print_parameter_summary
from .trainer import FNLTrainer

__all__ = [
    "FNLConfig",
    "FNLTrainer",
    "from_pretrained",
    "get_fnl_config",
    "is_patched",
    "parameter_summary",
    "patch_model",
    "print_parameter_summary",
    "recompose",
]
