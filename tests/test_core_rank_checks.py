"""The one rule for target parameter ratios (core.settings.check_param_ratio, re-exported by core.rank), shared by
the settings model (FNLConfig, fairseq flags) and rank_scale_for_param_ratio; the settings model loads without
torch."""

import subprocess
import sys

import pytest
from torch import nn

import fnl_transformers as fnl
from fnl_transformers.core.rank import check_param_ratio


@pytest.mark.parametrize("ratio", [1.5, 0, -0.1, float("nan"), float("inf"), True, "abc"])
def test_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(ValueError, match=r"target_ratio must be (a number )?in \(0, 1\]"):
        fnl.rank_scale_for_param_ratio(nn.Linear(20, 20), ratio)


def test_ratio_above_one_says_why():
    with pytest.raises(
        ValueError,
        match=r"got 1.5: keeping more parameters than the model has would need factorized "
        r"layers larger than the dense ones",
    ):
        check_param_ratio(1.5)


def test_same_rule_as_the_settings_model():
    from fnl_transformers.core import StructureSpec
    from fnl_transformers.hf import FNLConfig

    for ratio in (1.5, 0.0):
        with pytest.raises(ValueError, match=r"target_param_ratio must be (a number )?in \(0, 1\]"):
            FNLConfig(target_param_ratio=ratio)
        with pytest.raises(ValueError, match=r"target_param_ratio must be (a number )?in \(0, 1\]"):
            StructureSpec(target_param_ratio=ratio)
    assert check_param_ratio(1) == 1.0 and check_param_ratio(0.25) == 0.25
    assert 0 < fnl.rank_scale_for_param_ratio(nn.Linear(20, 20), 1.0)


def test_settings_model_imports_without_torch():
    code = (
        "import sys; from fnl_transformers.core.settings import check_param_ratio, specs_from_flat; "
        "specs_from_flat({'rank_scale': 0.5, 'head_dim': 4}); print('torch' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr
