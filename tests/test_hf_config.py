"""FNLConfig: validation with one clear message per problem, derived settings, JSON round trip."""
import json
import math

import pytest

from fnl_transformers.hf import FNLConfig


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank_scale=0), r"rank_scale must be a finite number > 0"),
    (dict(rank_scale=-0.5), r"rank_scale must be a finite number > 0"),
    (dict(rank_scale=math.nan), r"rank_scale must be a finite number > 0"),
    (dict(rank_scale="half"), r"rank_scale must be a number > 0, got 'half'"),
    (dict(factorize=("ffn", "mlp")),
     r"factorize: unknown part\(s\) \['mlp'\]; choose among \['ffn', 'embedding', 'attention'\]"),
    (dict(factorize=3), r"factorize must be a list of parts"),
    (dict(head_dim=0), r"head_dim must be a positive integer"),
    (dict(qk_head_dim=2.5), r"qk_head_dim must be a positive integer"),
    (dict(head_dim=8, ov_head_dim=4), r"give head_dim .* or qk_head_dim/ov_head_dim .*, not both"),
    (dict(rank_scale=0.5, target_param_ratio=0.5), r"give rank_scale or target_param_ratio, not both"),
    (dict(target_param_ratio=1.5), r"target_param_ratio must be a number in \(0, 1\]"),
    (dict(target_param_ratio=0.5, factorize=("attention",)), r"give head_dim .* explicitly, or drop 'attention'"),
    (dict(ranks={"*.dense": 0}), r"ranks\['\*\.dense'\] must be a positive integer"),
    (dict(ranks=["*.dense"]), r"ranks must be a dict"),
    (dict(fd_qk=-1e-4), r"fd_qk \(Frobenius decay coefficient\) must be a finite number >= 0"),
    (dict(fd_linear=math.inf), r"fd_linear .* must be a finite number >= 0"),
    (dict(fd_mode="both"), r"fd_mode must be one of \['coupled', 'decoupled'\]"),
    (dict(deep="yes"), r"deep must be True or False"),
])
def test_bad_input_gets_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FNLConfig(**kwargs)


def test_defaults_and_normalization():
    cfg = FNLConfig(rank_scale=1, factorize="ffn", fd_qk=1)
    assert cfg.rank_scale == 1.0 and cfg.factorize == ("ffn",) and cfg.fd_qk == 1.0
    assert cfg.fd_coefficients == {"linear": 0.0, "embedding": 0.0, "qk": 1.0, "ov": 0.0}
    assert FNLConfig().head_dims(32) == (32, 32)
    assert FNLConfig(head_dim=16).head_dims(32) == (16, 16)
    assert FNLConfig(ov_head_dim=8).head_dims(32) == (32, 8)
    assert FNLConfig(rank_scale=0.25, factorize=("attention",)).head_dims(32) == (8, 8)
    assert FNLConfig(rank_scale=0.25).head_dims(32) == (32, 32)  # 'attention' not in factorize


def test_dict_round_trip_through_json():
    cfg = FNLConfig(rank_scale=0.5, ranks={"*.intermediate.dense": 64}, qk_head_dim=16, deep=True, fd_ov=1e-4,
                    fd_mode="decoupled")
    again = FNLConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\]"):
        FNLConfig.from_dict({"rank": 3})
