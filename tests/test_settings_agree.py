"""The two integrations agree by construction: the same setting through the fairseq parser and through ``FNLConfig``
gives equal core specs (every field), and an equivalent model gets the same decay (FD / weight decay / none) for
the same kind of parameter."""

import dataclasses
import re

import pytest
import torch

import fairseq_helpers as fh

pytest.importorskip("fairseq")
pytest.importorskip("transformers")

from fnl_transformers.core import DecayPolicy, FDSpec, StructureSpec, flat_settings  # noqa: E402
from fnl_transformers.core.settings import flag  # noqa: E402
from fnl_transformers.fairseq_plugin.model import fnl_specs  # noqa: E402
from fnl_transformers.hf import FNLConfig  # noqa: E402

# three settings that together give every flat setting a value other than its default
CASES = [
    dict(
        rank_scale=0.5,
        factorize=("ffn", "attention"),
        ranks={"*.fc1": 3, "*dense": 2},
        head_dim=4,
        head_dim_ov=2,
        spectral_init=False,
        spectral_init_qk=True,
        spectral_init_ov=False,
        deep=True,
        fd_linear=0.1,
        fd_embedding=0.05,
        fd_qk=0.2,
        fd_ov=0.3,
        fd_mode="decoupled",
        weight_decay_factors=False,
    ),
    dict(
        target_param_ratio=0.6,
        factorize=("embedding",),
        head_dim_qk=3,
        fd_linear=0.1,
        factor_init="dense",
        reduced_heads="fresh",
    ),
    dict(rank_scale=1.5, fd_qk=1e-4, activation_aware=True, damping=0.05),
]


def _argv(values: dict) -> list:
    out = []
    for name, value in values.items():
        if isinstance(value, bool):
            out.append(flag(name) if value else "--no-" + flag(name)[2:])
        elif isinstance(value, tuple):
            out += [flag(name), ",".join(value)]
        elif isinstance(value, dict):
            out += [flag(name), ",".join(f"{k}={v}" for k, v in value.items())]
        else:
            out += [flag(name), str(value)]
    return out


def test_cases_cover_every_setting():
    defaults = {s.name: s.default for s in flat_settings()}
    changed = {name for case in CASES for name, value in case.items() if value != defaults[name]}
    assert changed == set(defaults)


@pytest.mark.parametrize("values", CASES)
def test_fairseq_flags_and_fnlconfig_give_equal_specs(values):
    from fairseq import options

    argv = [
        "unused-data",
        "--task",
        "translation",
        "--arch",
        "fnl_transformer_tiny",
        "--user-dir",
        fh.user_dir(),
        *_argv(values),
    ]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    structure, fd, policy = fnl_specs(args)
    cfg = FNLConfig(**values)
    for spec, other in ((structure, cfg.structure), (fd, cfg.fd)):
        assert type(spec) in (StructureSpec, FDSpec) and type(spec) is type(other)
        for f in dataclasses.fields(spec):
            assert getattr(spec, f.name) == getattr(other, f.name), f.name
    assert policy.weight_decay_factors == cfg.weight_decay_factors
    # and both equal the spec the values describe directly
    assert structure.head_dim_qk == values.get("head_dim_qk", values.get("head_dim"))


FFN = r"(fc[12]|intermediate\.dense|layer\.\d+\.output\.dense)"
ATTENTION = r"(q_proj|k_proj|v_proj|out_proj|self\.(query|key|value)|attention\.output\.dense)"
ROLES = [  # (pattern over fairseq's transformer and HF BERT names, role); first match wins
    (FFN + r"\.(U|V)$", ("ffn", "factor")),
    (FFN + r"\.bias$", ("ffn", "bias")),
    (r"(embed_tokens|word_embeddings)\.(U|V)$", ("embedding", "factor")),
    (r"(q_proj|k_proj|self\.query|self\.key)\.weight$", ("qk", "factor")),
    (r"(v_proj|out_proj|self\.value|attention\.output\.dense)\.weight$", ("ov", "factor")),
    (ATTENTION + r"\.bias$", ("attention", "bias")),
    (r"(layer_norm|LayerNorm)\.weight$", ("norm", "weight")),
    (r"(layer_norm|LayerNorm)\.bias$", ("norm", "bias")),
]


def _role(name: str):
    """(part, what) of a parameter of fairseq's transformer or HF's BERT; None for the others."""
    return next((role for pattern, role in ROLES if re.search(pattern, name)), None)


def _decay_by_role(named_decays) -> dict:
    out = {}
    for name, decay in named_decays:
        role = _role(name)
        if role is not None:
            out.setdefault(role, set()).add(decay)
    return out


def _group_decays(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    for g in optimizer.param_groups:
        decay = "fd" if g.get("fd_forms") else ("weight_decay" if g["weight_decay"] > 0 else "none")
        for p in g["params"]:
            yield names[id(p)], decay


@pytest.mark.parametrize("weight_decay_factors", [True, False])
def test_both_integrations_give_the_same_decay_per_parameter(tmp_path, weight_decay_factors):
    """FD on FFN and OV, none on the embeddings: fairseq (flambe, --no-decay-bias-norm, the Trainer convention)
    and HF (FNLTrainer, decoupled) put the same kinds of parameters in FD, weight decay and no decay."""
    from fairseq import optim as fairseq_optim
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from transformers import BertConfig, BertForMaskedLM

    from fnl_transformers.hf import FNLTrainer, patch_model

    from hf_trainer_helpers import MLMData, training_args

    values = dict(
        rank_scale=0.5,
        fd_linear=0.1,
        fd_embedding=0.0,
        fd_ov=0.1,
        fd_mode="decoupled",
        weight_decay_factors=weight_decay_factors,
    )
    data = fh.make_tiny_data(tmp_path / "data")
    model, _, args = fh.build_model(
        fh.tiny_train_args(
            data, "unused", *_argv(values), "--optimizer", "flambe", "--weight-decay", "0.01", "--no-decay-bias-norm"
        )
    )
    opt = fairseq_optim.build_optimizer(convert_namespace_to_omegaconf(args).optimizer, list(model.parameters()))
    fairseq_roles = _decay_by_role(_group_decays(opt, model))

    torch.manual_seed(0)
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=48,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=16,
            type_vocab_size=1,
        )
    )
    bert = patch_model(bert, FNLConfig(**values))
    trainer = FNLTrainer(model=bert, args=training_args(str(tmp_path / "hf")), train_dataset=MLMData(4))
    hf_roles = _decay_by_role(_group_decays(trainer.create_optimizer(), bert))

    factors = "weight_decay" if weight_decay_factors else "none"
    expected = {
        ("ffn", "factor"): {"fd"},
        ("ov", "factor"): {"fd"},
        ("embedding", "factor"): {factors},
        ("qk", "factor"): {factors},
        ("ffn", "bias"): {"none"},
        ("attention", "bias"): {"none"},
        ("norm", "weight"): {"none"},
        ("norm", "bias"): {"none"},
    }
    assert fairseq_roles == hf_roles == expected
    # the same policy object decides on both sides
    assert model.fnl_policy == DecayPolicy(FDSpec(0.1, 0.0, 0.0, 0.1, "decoupled"), weight_decay_factors, False)
    assert trainer.policy.fd == model.fnl_fd
