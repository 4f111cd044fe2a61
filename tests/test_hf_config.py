"""FNLConfig: a thin converter to the core settings model (validation with one clear message per problem,
derived settings, JSON round trip, former field names)."""

import dataclasses
import json
import math

import pytest

from fnl_transformers.core import FDSpec, StructureSpec, flat_settings
from fnl_transformers.hf import FNLConfig


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(rank_scale=0), r"rank_scale must be a finite number > 0"),
        (dict(rank_scale=-0.5), r"rank_scale must be a finite number > 0"),
        (dict(rank_scale=math.nan), r"rank_scale must be a finite number > 0"),
        (dict(rank_scale="half"), r"rank_scale must be a number > 0, got 'half'"),
        (
            dict(factorize=("ffn", "mlp")),
            r"factorize: unknown part\(s\) \['mlp'\]; choose among \['ffn', 'embedding', 'position', 'attention'\]",
        ),
        (dict(factorize=3), r"factorize must be a list of parts"),
        (dict(head_dim=0), r"head_dim must be a positive integer"),
        (dict(head_dim_qk=2.5), r"head_dim_qk must be a positive integer"),
        (dict(rank_scale=0.5, target_param_ratio=0.5), r"give rank_scale or target_param_ratio, not both"),
        (dict(target_param_ratio=1.5), r"target_param_ratio must be a number in \(0, 1\]"),
        (
            dict(target_param_ratio=0.5, factorize=("attention",)),
            r"give head_dim_qk/head_dim_ov explicitly, or drop 'attention'",
        ),
        (dict(factorize=("embeddings",)), r"'embeddings' is now spelled 'embedding'"),
        (dict(deep=True), r"deep needs rank_scale, ranks or target_param_ratio"),
        (dict(spectral_init_qk="yes"), r"spectral_init_qk must be True, False or None"),
        (dict(weight_decay_factors=1), r"weight_decay_factors must be True or False"),
        (dict(ranks={"*.dense": 0}), r"ranks\['\*\.dense'\] must be a positive integer"),
        (dict(ranks=["*.dense"]), r"ranks must be a dict"),
        (dict(fd_qk=-1e-4), r"fd_qk must be a finite number >= 0 \(Frobenius decay coefficient"),
        (dict(fd_embedding=math.nan), r"fd_embedding must be a finite number >= 0"),
        (dict(fd_linear=math.inf), r"fd_linear must be a finite number >= 0"),
        (dict(fd_mode="both"), r"fd_mode must be one of \['coupled', 'decoupled'\]"),
        (dict(deep="yes"), r"deep must be True or False"),
        (dict(factor_init="kaiming"), r"factor_init must be one of \['random', 'dense'\], got 'kaiming'"),
        (dict(reduced_heads="svd"), r"reduced_heads must be one of \['truncate', 'fresh'\], got 'svd'"),
    ],
)
def test_bad_input_gets_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FNLConfig(**kwargs)


def test_defaults_and_normalization():
    cfg = FNLConfig(rank_scale=1, factorize="ffn", fd_qk=1)
    assert cfg.rank_scale == 1.0 and cfg.factorize == ("ffn",) and cfg.fd_qk == 1.0
    assert cfg.fd.coefficients() == {"linear": 0.0, "embedding": 0.0, "qk": 1.0, "ov": 0.0}
    assert FNLConfig(fd_linear=2).fd.coefficients()["embedding"] == 2.0  # fd_embedding None follows fd_linear
    assert FNLConfig(fd_linear=2, fd_embedding=0).fd.coefficients()["embedding"] == 0.0
    assert FNLConfig().structure.head_dims(32) == (32, 32)
    assert FNLConfig(head_dim=16).structure.head_dims(32) == (16, 16)
    assert FNLConfig(head_dim_ov=8).structure.head_dims(32) == (32, 8)
    assert FNLConfig(head_dim=16, head_dim_ov=8).structure.head_dims(32) == (16, 8)  # specific overrides general
    assert FNLConfig(rank_scale=0.25, factorize=("attention",)).structure.head_dims(32) == (8, 8)
    assert FNLConfig(rank_scale=0.3, factorize=("attention",)).structure.head_dims(32) == (9, 9)  # floor of 9.6
    assert FNLConfig(rank_scale=0.25).structure.head_dims(32) == (32, 32)  # 'attention' not in factorize
    assert FNLConfig().structure == StructureSpec() and FNLConfig().fd == FDSpec()


def test_fields_are_the_core_flat_settings():
    """FNLConfig has exactly one field per core flat setting, same names, order and defaults."""
    cfg = FNLConfig()
    assert [f.name for f in dataclasses.fields(FNLConfig)] == [s.name for s in flat_settings()]
    for s in flat_settings():
        assert getattr(cfg, s.name) == s.default, s.name
        assert s.help in FNLConfig.__doc__


def test_dict_round_trip_through_json():
    cfg = FNLConfig(
        rank_scale=0.5,
        ranks={"*.intermediate.dense": 64},
        head_dim_qk=16,
        deep=True,
        fd_ov=1e-4,
        fd_mode="decoupled",
        spectral_init_ov=True,
        weight_decay_factors=False,
    )
    again = FNLConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.structure == cfg.structure and again.fd == cfg.fd


def test_former_field_names_still_read():
    old = {"rank_scale": 0.5, "qk_head_dim": 4, "ov_head_dim": 2, "fd_embedding": 0.0}
    cfg = FNLConfig.from_dict(old)
    assert (cfg.head_dim_qk, cfg.head_dim_ov, cfg.fd_embedding) == (4, 2, 0.0)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\]"):
        FNLConfig.from_dict({"rank": 3})
