"""The torch-only core: factorized layers, spectral initialization, Frobenius decay, attention forms."""
from .attention import attention_spectral_init
from .checks import NonFiniteError, check_finite
from .forms import (
    KINDS,
    BoundForm,
    FactorView,
    FormSpec,
    attention_form_specs,
    attention_forms,
    form_parameters,
    iter_forms,
    module_forms,
    register_attention_forms,
)
from .frobenius import (
    accumulate_fd_grads,
    check_fd_coefficients,
    fd_grads,
    form_diagnostics,
    form_grads,
    form_sq_norms,
    frobenius_penalty,
    frobenius_penalty_by_kind,
)
from .layers import INIT_METHODS, FactorizedEmbedding, FactorizedLinear
from .rank import factorized_param_count, rank_from_scale, rank_scale_for_param_ratio, resolve_rank
from .spectral import head_spectral_init, spectral_init, tail_energy

__all__ = [
    "check_fd_coefficients",
    "NonFiniteError",
    "check_finite",
    "BoundForm",
    "FactorView",
    "FactorizedEmbedding",
    "FactorizedLinear",
    "FormSpec",
    "INIT_METHODS",
    "KINDS",
    "accumulate_fd_grads",
    "attention_form_specs",
    "attention_forms",
    "attention_spectral_init",
    "factorized_param_count",
    "fd_grads",
    "form_diagnostics",
    "form_grads",
    "form_parameters",
    "form_sq_norms",
    "frobenius_penalty",
    "frobenius_penalty_by_kind",
    "head_spectral_init",
    "iter_forms",
    "module_forms",
    "rank_from_scale",
    "rank_scale_for_param_ratio",
    "register_attention_forms",
    "resolve_rank",
    "spectral_init",
    "tail_energy",
]
