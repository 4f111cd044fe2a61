"""HuggingFace integration: factorize a ``transformers`` model before training, reload it, recompose it.

Importing this package imports ``transformers`` (``import fnl_transformers`` alone never does)::

    from fnl_transformers.hf import FNLConfig, patch_model, from_pretrained, recompose

    model = patch_model(model, FNLConfig(rank_scale=0.5, head_dim=16, fd_qk=1e-4, fd_ov=1e-4))
    model.save_pretrained(out)            # stores the plan in config.json
    model = from_pretrained(out)          # rebuilds and loads strictly
    vanilla = recompose(model)            # plain architecture, same outputs
    trainer = FNLTrainer(model=model, args=training_args, train_dataset=ds)  # FD once per update
"""
from .config import FNLConfig
from .patch import get_fnl_config, is_patched, patch_model, recompose
from .pretrained import from_pretrained
from .trainer import FNLTrainer

__all__ = ["FNLConfig", "FNLTrainer", "from_pretrained", "get_fnl_config", "is_patched", "patch_model", "recompose"]
