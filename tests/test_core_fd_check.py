"""FD that would penalize nothing: one clear error (see fnl_transformers.core.fd_check for why not a warning)."""
import pytest
import torch
from torch import nn

import fnl_transformers as fnl
from fnl_transformers.core.fd_check import check_fd_applies, form_kinds


def _factorized():
    torch.manual_seed(0)
    return nn.Sequential(fnl.FactorizedLinear(6, 5, rank=2), nn.ReLU(), nn.Linear(5, 3))


def test_form_kinds():
    assert form_kinds(nn.Sequential(nn.Linear(3, 3))) == frozenset()
    model = _factorized()
    assert form_kinds(model) == {"linear"}
    model.append(fnl.FactorizedEmbedding(10, 4, rank=2))
    assert form_kinds(model) == {"linear", "embedding"}


def test_nothing_to_penalize_is_an_error():
    with pytest.raises(ValueError, match=r"Frobenius decay is set \(linear=0.001, qk=0.01\) but the model has no "
                                         r"factorized forms.*penalty would be 0: factorize the model first"):
        check_fd_applies({"linear": 1e-3, "embedding": 0.0, "qk": 1e-2}, form_kinds(nn.Linear(3, 3)))


def test_explicit_coefficient_of_an_absent_kind_is_an_error_a_defaulted_one_is_not():
    present = form_kinds(_factorized())
    coeffs = {"linear": 1e-3, "embedding": 1e-3}  # embedding following linear by default: fine
    check_fd_applies(coeffs, present)
    with pytest.raises(ValueError, match=r"Frobenius decay embedding=0.001 applies to nothing: the model has no "
                                         r"embedding forms \(it has linear\)"):
        check_fd_applies(coeffs, present, explicit={"embedding"})


def test_no_active_coefficient_never_complains():
    check_fd_applies({"linear": 0.0, "qk": 0.0}, set(), explicit={"linear", "qk"})
    check_fd_applies({}, set())
