"""HuggingFace integration: factorize a ``transformers`` model before training, reload it, recompose it.

The names below import ``transformers`` on first use (``import fnl_transformers`` alone never does, and the
``fnl`` command checks its options before loading it)::

    from fnl_transformers.hf import FNLConfig, patch_model, from_pretrained, recompose

    model = patch_model(model, FNLConfig(rank_scale=0.5, head_dim=16, fd_qk=1e-4, fd_ov=1e-4))
    model.save_pretrained(out)            # stores the plan in config.json
    model = from_pretrained(out)          # rebuilds and loads strictly
    print_parameter_summary(model)        # trainable / factorized / attention parameters, vs. the original
    vanilla = recompose(model)            # plain architecture, same outputs
    trainer = FNLTrainer(model=model, args=training_args, train_dataset=ds)  # FD once per update
"""
from importlib import import_module

_EXPORTS = {
    ".config": ("FNLConfig",),
    ".patch": ("get_fnl_config", "is_patched", "patch_model", "recompose"),
    ".pretrained": ("from_pretrained",),
    ".summary": ("parameter_summary", "print_parameter_summary"),
    ".trainer": ("FNLTrainer",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["FNLConfig", "FNLTrainer", "from_pretrained", "get_fnl_config", "is_patched", "parameter_summary",
           "patch_model", "print_parameter_summary", "recompose"]


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
