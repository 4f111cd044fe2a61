"""``patch_model``: factorize a HuggingFace transformer in place, as its :mod:`~fnl_transformers.hf.plan` says.

Paper: Khodak et al., ICLR 2021. FFN and embedding layers become ``U [M] V^T`` factors with spectral
initialization (Definition 3.1) from the pretrained weights; attention heads, already factorized as per-head QK
and OV forms (Sec. 2.3, Eq. (1)), are resized by the core's attention surgery (core
:func:`~fnl_transformers.core.shrink_heads`) and registered as forms, so
:func:`~fnl_transformers.core.frobenius_penalty` and the optimizers' FD find them.

With ``activation_aware`` the same layers and head forms are truncated in the norm of their outputs on calibration
data (core :mod:`~fnl_transformers.core.activation`): ``patch_model(..., calibration=(tokenizer, texts))`` collects
every needed layer's input statistics in one forward pass of the vanilla model
(:func:`~fnl_transformers.hf.calibration.collect_input_stats`) before any layer is replaced, or takes statistics
collected beforehand. A layer the calibration never reached keeps weight-only SI (one warning names them).

Only projection layers are replaced (attention classes stay, so ``output_attentions`` keeps working); the
attention's ``scaling`` stays ``1/sqrt(original head_dim)``, except under ``reduced_heads='fresh'`` (the official
code's rule: ``1/sqrt(reduced QK head dim)``). The plan is recorded in ``model.config.fnl_config``
(:mod:`~fnl_transformers.hf.persist`): ``save_pretrained`` stores it in ``config.json`` and
:func:`~fnl_transformers.hf.from_pretrained` rebuilds the same architecture from it (:func:`apply_plan`, shapes
only).
"""

from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import PreTrainedModel

from ..core import (
    FactorizedEmbedding,
    FactorizedLinear,
    form_rel_errors,
    head_products,
    register_attention_forms,
)
from ..core.activation import (
    HeadCalibration,
    HeadInputStats,
    InputStats,
    TokenCounts,
    activation_init,
    embedding_activation_init,
)
from ..core.heads import Tensors, shrink_heads_with_errors
from ..core.sharded import holds_dtensors
from .arch import Arch, arch_for, set_submodule
from .config import FNLConfig
from .layers import TiedFactorizedHead
from .persist import is_patched, record_plan
from .plan import AttentionEntry, LayerEntry, Plan, make_plan, num_params

Calibration = Union[Tuple[object, Sequence[str]], Mapping[str, object]]


def patch_model(
    model: PreTrainedModel, config: Optional[FNLConfig] = None, calibration: Optional[Calibration] = None
) -> PreTrainedModel:
    """Factorize ``model`` in place as ``config`` says (see :class:`FNLConfig`) and return it.

    With ``spectral_init`` (default) every factorized layer and every shrunk head form starts at the best
    rank-r approximation of the pretrained weights; at full rank the outputs are unchanged. With
    ``activation_aware`` the approximation is the best one for each layer's outputs on ``calibration``:
    ``(tokenizer, texts)`` (run through the model once, before it is changed) or the statistics
    :func:`~fnl_transformers.hf.calibration.collect_input_stats` returned for it (only used for this call; never
    stored). The model keeps its class; ``model.fnl_config`` is the ``FNLConfig`` and ``model.config.fnl_config``
    the resolved plan (with each layer's approximation errors).
    """
    config = FNLConfig() if config is None else config
    if not isinstance(config, FNLConfig):
        raise TypeError(f"config must be a fnl_transformers.hf.FNLConfig, got {type(config).__name__}")
    _check_unpatched(model)
    structure = config.structure
    if structure.activation_aware and calibration is None:
        raise ValueError(
            "activation_aware=True truncates in the norm of the layers' outputs on calibration data: "
            "pass patch_model(model, config, calibration=(tokenizer, texts))"
        )
    if calibration is not None and not structure.activation_aware:
        raise ValueError(
            "calibration data is used by activation-aware truncation only: set "
            "FNLConfig(activation_aware=True), or drop calibration"
        )
    arch = arch_for(model)
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    plan, weights = make_plan(model, config)  # every refusal happens here, before the model is touched
    stats = None if calibration is None else _statistics(model, arch, plan, calibration)
    fresh = _fresh_init(model)
    unreached: List[str] = []
    for name, entry in plan.attention.items():
        head_stats = None
        if "activation" in (entry.init_qk, entry.init_ov):
            head_stats = _head_calibration(arch, name, entry, stats or {}, structure.damping)
            if head_stats is None:  # the calibration never reached it: weight-only per-head SI
                unreached.append(name)
                entry.init_qk, entry.init_ov = (
                    ("spectral" if i == "activation" else i) for i in (entry.init_qk, entry.init_ov)
                )
        apply_attention(arch, model.get_submodule(name), entry, weights[name], fresh, head_stats)
    init = structure.layer_init
    fill = _dense_fill(model) if init == "dense" else None
    for name, layer_entry in plan.layers.items():
        layer_init, layer_stats = init, None
        if init == "activation" and layer_entry.type != "tied_head":
            layer_stats = (stats or {}).get(name)
            if layer_stats is None:
                unreached.append(name)
                layer_init = "spectral"
        apply_layer(model, arch, name, layer_entry, layer_init, fill, layer_stats, structure.damping)
    if unreached:
        more = f" (+{len(unreached) - 3} more)" if len(unreached) > 3 else ""
        warnings.warn(
            f"activation_aware: no calibration statistics for {', '.join(unreached[:3])}{more} (the "
            "calibration texts never reached them, or the statistics given lack them); weight-only SI "
            "there",
            UserWarning,
            stacklevel=2,
        )
    _finish(model, arch, plan, tied)
    return model


def _statistics(model: nn.Module, arch: Arch, plan: Plan, calibration: Calibration) -> Mapping[str, object]:
    """Input statistics of the layers ``plan`` truncates activation-aware: collected from ``(tokenizer, texts)``
    in one pass of the still vanilla model, or the mapping given."""
    if isinstance(calibration, Mapping):
        return calibration
    if not isinstance(calibration, (tuple, list)) or len(calibration) != 2:
        raise TypeError(
            "calibration must be (tokenizer, texts) or the statistics collect_input_stats returned, got "
            f"{type(calibration).__name__}"
        )
    from .calibration import collect_input_stats

    tokenizer, texts = calibration
    layers = [n for n, e in plan.layers.items() if e.type != "tied_head"]
    inputs, mixing = [], []
    for name, entry in plan.attention.items():
        if "activation" in (entry.init_qk, entry.init_ov):
            inputs += list(dict.fromkeys([f"{name}.{arch.q}", f"{name}.{arch.k}"]))
            if entry.init_ov == "activation":
                mixing.append(name)
    return collect_input_stats(model, tokenizer, texts, modules=list(dict.fromkeys(layers + inputs)), attention=mixing)


def _head_calibration(
    arch: Arch, name: str, entry: AttentionEntry, stats: Mapping[str, object], damping: float
) -> Optional[HeadCalibration]:
    """The statistics of a self-attention's input (``None`` where there are none, or where queries and keys read
    different inputs, as in cross-attention), with each head's mixed-input statistics for the OV forms if
    recorded."""
    q = stats.get(f"{name}.{arch.q}")
    k = stats.get(f"{name}.{arch.k}")
    if not isinstance(q, InputStats) or not isinstance(k, InputStats):
        return None
    if k is not q and not torch.equal(k.gram, q.gram):
        return None
    ov = stats.get(name)
    ov_moment = ov.second_moment if isinstance(ov, HeadInputStats) and ov.heads == entry.heads else None
    return HeadCalibration(q.second_moment, q.mean, ov_moment, damping)


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


def apply_attention(
    arch: Arch,
    att: nn.Module,
    entry: AttentionEntry,
    t: Optional[Tensors],
    fresh=None,
    calibration: Optional[HeadCalibration] = None,
) -> None:
    """Resize / re-initialize ``att`` as ``entry`` says from its weights ``t`` (full heads; ``None``: shapes only,
    the weights are loaded next), recording the per-form approximation errors of spectral and activation-aware
    initializations (``calibration``: the statistics activation-aware forms need)."""
    dims = entry.dims
    if entry.score_factor != 1.0:  # reduced_heads='fresh': scores scaled by 1/sqrt(reduced QK head dim)
        arch.scale_scores(att, entry.score_factor)
    if t is None:
        if dims.changed:
            arch.write(att, {}, dims)
        return
    if not entry.touched:
        return
    new, fits = shrink_heads_with_errors(t, dims, entry.init_qk, entry.init_ov, fresh, calibration)
    arch.write(att, new, dims)
    measured = ("spectral", "activation")
    if entry.init_qk in measured or entry.init_ov in measured:
        errors = form_rel_errors(head_products(t, dims.full), head_products(new, dims))
        entry.qk_rel_error = errors["qk"] if entry.init_qk in measured else None
        entry.ov_rel_error = errors["ov"] if entry.init_ov in measured else None
    entry.qk_fit = fits["qk"].as_dict() if "qk" in fits else None
    entry.ov_fit = fits["ov"].as_dict() if "ov" in fits else None


# ------------------------------------------------------------------------------------------------- layers
def apply_layer(
    model: nn.Module,
    arch: Arch,
    name: str,
    entry: LayerEntry,
    init: str,
    fill=None,
    stats=None,
    damping: Optional[float] = None,
) -> None:
    """Replace layer ``name`` by its factorized form (``init``: spectral / activation / random / dense / skip;
    ``fill``: the dense layers' initialization, for ``dense``; ``activation`` needs the layer's input ``stats``
    and the ``damping``)."""
    layer = model.get_submodule(name)
    rank, deep = entry.rank, entry.deep
    fit = None
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
            how = init
            if init == "activation":
                U, V, fit = embedding_activation_init(W, rank, _counts(name, stats), damping=damping)
                how = lambda weight, r, generator=None: (U, V)  # noqa: E731  (factors computed above)
            saved, layer.padding_idx = layer.padding_idx, entry.padding_idx
            try:
                new = FactorizedEmbedding.from_embedding(layer, rank=rank, init=how, deep=deep, fill=fill)
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
            how = init
            if init == "activation":
                U, V, fit = activation_init(W, rank, _second_moment(name, stats), damping=damping)
                how = lambda weight, r, generator=None: (U, V)  # noqa: E731  (factors computed above)
            new = FactorizedLinear.from_linear(dense, rank=rank, init=how, deep=deep, fill=fill)
        if entry.kind == "embedding":
            new.fd_kind = "embedding"  # an untied output embedding is regularized as an embedding
    if init != "skip":
        entry.params = [before, sum(p.numel() for p in new.parameters())]
    if init in ("spectral", "activation"):
        entry.rel_error = _rel_error(W.detach().float(), new.product())
    entry.fit = None if fit is None else fit.as_dict()
    set_submodule(model, name, new)


def _counts(name: str, stats) -> torch.Tensor:
    if not isinstance(stats, TokenCounts):
        raise TypeError(
            f"calibration statistics of the embedding {name} must be token counts (TokenCounts), got "
            f"{type(stats).__name__}"
        )
    return stats.counts


def _second_moment(name: str, stats) -> torch.Tensor:
    if not isinstance(stats, InputStats):
        raise TypeError(
            f"calibration statistics of the layer {name} must be its input statistics (InputStats), got "
            f"{type(stats).__name__}"
        )
    return stats.second_moment


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
    if holds_dtensors(model):
        raise ValueError(
            "patch_model cannot factorize a model whose parameters are FSDP2 shards (DTensors): patch first, then "
            "shard: model = patch_model(model, config), then fully_shard(...) (or FNLTrainer's fsdp arguments)"
        )
    if is_patched(model):
        raise ValueError("this model is already patched by fnl_transformers; recompose(model) first to re-patch")


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
