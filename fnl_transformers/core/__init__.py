"""The torch-only core: factorized layers, spectral initialization, Frobenius decay, attention forms and surgery,
the settings model and the decay policy.

Names are imported on first use (PEP 562), so importing this package or a torch-free module of it (the settings
model, :mod:`.settings`) does not import torch: the ``fnl`` command checks its options before torch loads.
"""

from importlib import import_module

_EXPORTS = {
    ".attention": ("attention_spectral_init",),
    ".checks": ("NonFiniteError", "check_finite"),
    ".forms": (
        "BoundForm",
        "FactorView",
        "FormSpec",
        "attention_form_specs",
        "attention_forms",
        "clear_attention_forms",
        "form_parameters",
        "iter_forms",
        "iter_specs",
        "module_forms",
        "module_lookup",
        "register_attention_forms",
    ),
    ".frobenius": (
        "accumulate_fd_grads",
        "fd_grads",
        "form_diagnostics",
        "form_grads",
        "form_sq_norms",
        "frobenius_penalty",
        "frobenius_penalty_by_kind",
    ),
    ".heads": (
        "HeadDims",
        "form_param_counts",
        "form_rel_errors",
        "head_products",
        "head_shapes",
        "pad_heads",
        "shrink_heads",
        "shrink_heads_with_errors",
    ),
    ".layers": ("INIT_METHODS", "FactorizedEmbedding", "FactorizedLinear"),
    ".policy": (
        "FD",
        "NO_DECAY",
        "WEIGHT_DECAY",
        "DecayPolicy",
        "default_no_decay",
        "form_memberships",
        "forms_from_memberships",
    ),
    ".rank": (
        "factorized_param_count",
        "plan_ranks",
        "rank_from_scale",
        "rank_scale_for_budget",
        "rank_scale_for_param_ratio",
        "resolve_rank",
    ),
    ".settings": (
        "FACTOR_INITS",
        "FD_MODES",
        "HEAD_RULES",
        "KINDS",
        "PARTS",
        "FDSpec",
        "SettingsError",
        "StructureSpec",
        "check_fd_coefficients",
        "check_shrink",
        "flat_settings",
        "specific_head_dims",
    ),
    ".spectral": ("head_spectral_init", "spectral_init", "tail_energy"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
