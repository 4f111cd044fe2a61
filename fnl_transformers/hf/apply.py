"""``patch_model``: factorize a HuggingFace transformer in place, as its :mod:`~fnl_transformers.hf.plan` says.

Paper: Khodak et al., ICLR 2021. FFN and embedding layers become ``U [M] V^T`` factors with spectral
initialization (Definition 3.1) from the pretrained weights; attention heads, already factorized as per-head QK
and OV forms (Sec. 2.3, Eq. (1)), are resized by the core's attention surgery (core
:func:`~fnl_transformers.core.shrink_heads`) and registered as forms, so
:func:`~fnl_transformers.core.frobenius_penalty` and the optimizers' FD find them.

Only projection layers are replaced (attention classes stay, so ``output_attentions`` keeps working); the
attention's ``scaling`` stays ``1/sqrt(original head_dim)``, except under ``reduced_heads='fresh'`` (the official
code's rule: ``1/sqrt(reduced QK head dim)``). The plan is recorded in ``model.config.fnl_config``
(:mod:`~fnl_transformers.hf.persist`): ``save_pretrained`` stores it in ``config.json`` and
:func:`~fnl_transformers.hf.from_pretrained` rebuilds the same architecture from it (:func:`apply_plan`, shapes
only).
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from ..core import (
    FactorizedEmbedding,
    FactorizedLinear,
    form_rel_errors,
    head_products,
    register_attention_forms,
    shrink_heads,
)
from ..core.heads import Tensors
from .arch import Arch, arch_for, set_submodule
from .config import FNLConfig
from .layers import TiedFactorizedHead
from .persist import is_patched, record_plan
from .plan import AttentionEntry, LayerEntry, Plan, make_plan, num_params


def patch_model(model: PreTrainedModel, config: Optional[FNLConfig] = None) -> PreTrainedModel:
    """Factorize ``model`` in place as ``config`` says (see :class:`FNLConfig`) and return it.

    With ``spectral_init`` (default) every factorized layer and every shrunk head form starts at the best
    rank-r approximation of the pretrained weights; at full rank the outputs are unchanged. The model keeps its
    class; ``model.fnl_config`` is the ``FNLConfig`` and ``model.config.fnl_config`` the resolved plan.
    """
    config = FNLConfig() if config is None else config
    if not isinstance(config, FNLConfig):
        raise TypeError(f"config must be a fnl_transformers.hf.FNLConfig, got {type(config).__name__}")
    _check_unpatched(model)
    arch = arch_for(model)
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    plan, weights = make_plan(model, config)  # every refusal happens here, before the model is touched
    fresh = _fresh_init(model)
    for name, entry in plan.attention.items():
        apply_attention(arch, model.get_submodule(name), entry, weights[name], fresh)
    init = config.structure.layer_init
    fill = _dense_fill(model) if init == "dense" else None
    for name, layer_entry in plan.layers.items():
        apply_layer(model, arch, name, layer_entry, init, fill)
    _finish(model, arch, plan, tied)
    return model


def apply_plan(model: PreTrainedModel, plan: Plan) -> PreTrainedModel:
    """Rebuild the patched architecture described by ``plan`` on a vanilla ``model`` without computing any
    factor (weights are loaded next). Used by :func:`fnl_transformers.hf.from_pretrained`."""
    _check_unpatched(model)
    arch = arch_for(model)
    if plan.arch != arch.name:
        raise ValueError(f"the saved fnl_config is for {plan.arch!r} but the model is {arch.name!r}")
    found = {n for n, _ in arch.attention_modules(model)}
    missing = [n for n in list(plan.attention) + list(plan.layers) if not _has_module(model, n)]
    if missing or set(plan.attention) != found:
        raise ValueError(
            f"the saved fnl_config does not match this model's modules (missing: {missing[:3]}); was it saved from "
            "a different architecture or a sub-model?"
        )
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    for name, entry in plan.attention.items():
        apply_attention(arch, model.get_submodule(name), entry, None)
    # tied heads after their embedding (config.json stores the plan with sorted keys)
    for name, layer_entry in sorted(plan.layers.items(), key=lambda item: item[1].type == "tied_head"):
        apply_layer(model, arch, name, layer_entry, "skip")
    _finish(model, arch, copy.deepcopy(plan), tied)
    return model


# ------------------------------------------------------------------------------------------------- attention
def _initializer_std(model: nn.Module) -> float:
    return float(getattr(model.config, "initializer_range", 0.02))


def _dense_fill(model: nn.Module):
    """The dense layers' initialization of transformers' supported models, ``N(0, initializer_range^2)``: what
    ``factor_init='dense'`` draws each factor from (GPT-2's depth-scaled ``c_proj`` excepted: it is drawn at the
    same std)."""
    std = _initializer_std(model)
    return lambda t: nn.init.normal_(t, 0.0, std)


def _fresh_init(model: nn.Module):
    """A new projection's tensors as transformers initializes them: weights ``N(0, initializer_range^2)``,
    biases zero (the random head initialization of core ``shrink_heads``)."""
    std = _initializer_std(model)

    def fresh(key: str, shape, like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return out.normal_(0.0, std) if key.endswith("weight") else out

    return fresh


def apply_attention(arch: Arch, att: nn.Module, entry: AttentionEntry, t: Optional[Tensors], fresh=None) -> None:
    """Resize / re-initialize ``att`` as ``entry`` says from its weights ``t`` (full heads; ``None``: shapes only,
    the weights are loaded next), recording the per-form approximation error of spectral initializations."""
    dims = entry.dims
    if entry.score_factor != 1.0:  # reduced_heads='fresh': scores scaled by 1/sqrt(reduced QK head dim)
        arch.scale_scores(att, entry.score_factor)
    if t is None:
        if dims.changed:
            arch.write(att, {}, dims)
        return
    if not entry.touched:
        return
    new = shrink_heads(t, dims, entry.init_qk, entry.init_ov, fresh)
    arch.write(att, new, dims)
    if "spectral" in (entry.init_qk, entry.init_ov):
        errors = form_rel_errors(head_products(t, dims.full), head_products(new, dims))
        entry.qk_rel_error = errors["qk"] if entry.init_qk == "spectral" else None
        entry.ov_rel_error = errors["ov"] if entry.init_ov == "spectral" else None


# ------------------------------------------------------------------------------------------------- layers
def apply_layer(model: nn.Module, arch: Arch, name: str, entry: LayerEntry, init: str, fill=None) -> None:
    """Replace layer ``name`` by its factorized form (``init``: spectral / random / dense / skip; ``fill``: the
    dense layers' initialization, for ``dense``)."""
    layer = model.get_submodule(name)
    rank, deep = entry.rank, entry.deep
    if entry.type == "tied_head":
        emb = model.get_submodule(entry.embedding)
        set_submodule(model, name, TiedFactorizedHead(emb, getattr(layer, "bias", None) if entry.bias else None))
        return
    before = sum(p.numel() for p in layer.parameters())
    if entry.type == "embedding":
        W = layer.weight
        if init == "skip":
            new = FactorizedEmbedding(*W.shape, rank, entry.padding_idx, deep, dtype=W.dtype, device=W.device)
        else:
            saved, layer.padding_idx = layer.padding_idx, entry.padding_idx
            try:
                new = FactorizedEmbedding.from_embedding(layer, rank=rank, init=init, deep=deep, fill=fill)
            finally:
                layer.padding_idx = saved
    else:
        W, bias = arch.linear_weight(layer)
        m, n = W.shape
        if init == "skip":
            new = FactorizedLinear(n, m, rank, bias=bias is not None, deep=deep, dtype=W.dtype, device=W.device)
        else:
            dense = layer
            if not isinstance(layer, nn.Linear):  # Conv1D: an nn.Linear view of its transposed weight
                dense = nn.Linear(n, m, bias=bias is not None, device="meta")
                dense.weight = nn.Parameter(W.detach(), requires_grad=False)
                dense.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
            new = FactorizedLinear.from_linear(dense, rank=rank, init=init, deep=deep, fill=fill)
        if entry.kind == "embedding":
            new.fd_kind = "embedding"  # an untied output embedding is regularized as an embedding
    if init != "skip":
        entry.params = [before, sum(p.numel() for p in new.parameters())]
    if init == "spectral":
        entry.rel_error = _rel_error(W.detach().float(), new.product())
    set_submodule(model, name, new)


def _rel_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``||ref - approx||_F / ||ref||_F`` (0 for an all-zero reference that is matched exactly)."""
    ref, approx = ref.detach().float(), approx.detach().float()
    den = float(ref.norm())
    num = float((ref - approx).norm())
    return num / den if den > 0 else num


# ------------------------------------------------------------------------------------------------- bookkeeping
def _own_config(model: nn.Module) -> None:
    """Give ``model`` (and its submodules, which reference the same object) a private copy of its config, so
    recording the plan never alters another model built from the same config object."""
    shared, own = model.config, copy.deepcopy(model.config)
    for module in model.modules():
        if module.__dict__.get("config") is shared:
            module.config = own


def _finish(model, arch: Arch, plan: Plan, tied: Dict[str, str]) -> None:
    """Register the attention forms, keep tied weights consistent, and record the plan on the model."""
    for name, entry in plan.attention.items():
        register_attention_forms(model.get_submodule(name), arch.form_specs(entry.dims))
    heads = [n for n, e in plan.layers.items() if e.type == "tied_head"]
    if heads:
        # the tied head reads the factorized embedding itself; drop the now meaningless weight tie (keep others,
        # e.g. BERT's decoder bias) so transformers' tie_weights never looks for a dense embedding weight
        emb = plan.layers[heads[0]].embedding
        mapping = {t: s for t, s in tied.items() if s != f"{emb}.weight" and t != f"{heads[0]}.weight"}
        model._tied_weights_keys = mapping
        model.all_tied_weights_keys = dict(mapping)
    plan.params_after = num_params(model)
    _own_config(model)
    record_plan(model, plan)


def _check_unpatched(model) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"patch_model expects a transformers PreTrainedModel, got {type(model).__name__}")
    if is_patched(model):
        raise ValueError("this model is already patched by fnl_transformers; recompose(model) first to re-patch")


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
