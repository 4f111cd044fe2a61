"""The torch-only core: factorized layers, spectral initialization, Frobenius decay, attention forms.

Names are imported on first use (PEP 562), so importing this package, or a torch-free submodule of it such as
:mod:`.rank`'s validators, does not import torch: the ``fnl`` command checks its options before loading torch.
"""
from importlib import import_module

_EXPORTS = {
    ".attention": ("attention_spectral_init",),
    ".checks": ("NonFiniteError", "check_finite"),
    ".forms": ("KINDS", "BoundForm", "FactorView", "FormSpec", "attention_form_specs", "attention_forms",
               "form_parameters", "iter_forms", "module_forms", "register_attention_forms"),
    ".frobenius": ("accumulate_fd_grads", "check_fd_coefficients", "fd_grads", "form_diagnostics", "form_grads",
                   "form_sq_norms", "frobenius_penalty", "frobenius_penalty_by_kind"),
    ".layers": ("INIT_METHODS", "FactorizedEmbedding", "FactorizedLinear"),
    ".rank": ("factorized_param_count", "rank_from_scale", "rank_scale_for_param_ratio", "resolve_rank"),
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
