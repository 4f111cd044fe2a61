"""Frobenius decay that would apply to nothing is an error, not a silent zero.

FD (paper Definition 3.2) penalizes the products of a model's factorized forms. With a nonzero coefficient and no
form of that kind in the model (an unpatched model; embeddings or attention left out of the factorization), the
penalty is identically zero and training silently runs without the regularization that was asked for.

Why an error and not a warning: the penalty is evaluated at every step of a training loop, where a warning is
either repeated or printed once and scrolled away, while the run goes on without FD; the fix (patch the model,
or set the coefficient to 0) is always available before training starts. Coefficients that only follow a default
(FDSpec's ``embedding = None`` means "same as linear") are not errors when their kind is absent: a model whose
embeddings are not factorized is a normal configuration. So:

* every active kind absent (nothing at all would be penalized): error;
* a kind whose coefficient was set *explicitly* and is absent: error;
* an absent kind whose coefficient only follows a default: fine.

:func:`check_fd_applies` takes the kinds present (:func:`form_kinds` of the model, or the kinds a penalty
computation found while iterating the forms anyway) so it costs nothing per step.
"""
from __future__ import annotations

from typing import FrozenSet, Iterable, Mapping

from .forms import KINDS, module_forms


def form_kinds(model) -> FrozenSet[str]:
    """The kinds (``linear``, ``embedding``, ``qk``, ``ov``) of the factorized forms ``model`` has."""
    return frozenset(spec.kind for module in model.modules() for spec in module_forms(module))


def check_fd_applies(coefficients: Mapping[str, float], present: Iterable[str], explicit: Iterable[str] = ()) -> None:
    """One clear ``ValueError`` when FD ``coefficients`` (``{kind: lambda}``) would penalize nothing in a model whose
    form kinds are ``present``, or when a kind in ``explicit`` (coefficients the user set) has no form."""
    present = set(present)
    active = [k for k in KINDS if float(coefficients.get(k, 0.0) or 0.0) > 0]
    if not active:
        return
    missing = [k for k in active if k not in present]
    if len(missing) == len(active):
        setting = ", ".join(f"{k}={coefficients[k]:g}" for k in active)
        raise ValueError(
            f"Frobenius decay is set ({setting}) but the model has no factorized forms of those kinds, so the "
            "penalty would be 0: factorize the model first (fnl_transformers.hf.patch_model, or a fnl_transformer "
            "fairseq model), or set the coefficients to 0"
        )
    unused = [k for k in missing if k in set(explicit)]
    if unused:
        setting = ", ".join(f"{k}={coefficients[k]:g}" for k in unused)
        raise ValueError(
            f"Frobenius decay {setting} applies to nothing: the model has no {'/'.join(unused)} forms (it has "
            f"{', '.join(sorted(present)) or 'none'}); factorize that part, or set the coefficient to 0"
        )
