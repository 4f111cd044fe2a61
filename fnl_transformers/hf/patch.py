"""``patch_model``: factorize a HuggingFace transformer in place, and ``recompose`` it back to a vanilla model.

Paper: Khodak et al., ICLR 2021. FFN and embedding layers become ``U [M] V^T`` factors with spectral
initialization (Sec. 3.1) from the pretrained weights; attention heads, already factorized as per-head QK and
OV forms (Sec. 4), are shrunk by per-head SI (core :func:`~fnl_transformers.core.attention_spectral_init`)
and registered as forms, so :func:`~fnl_transformers.core.frobenius_penalty` and the optimizers' FD find them.

Only projection layers are replaced (attention classes stay, so ``output_attentions`` keeps working); the
attention's ``scaling`` stays ``1/sqrt(original head_dim)``. Every decision (ranks, head dims, padding index)
is written to a JSON *plan* kept in ``model.config.fnl_config``: ``save_pretrained`` stores it in
``config.json`` and :func:`fnl_transformers.hf.from_pretrained` rebuilds the same architecture from it.
"""
from __future__ import annotations

import copy
import fnmatch
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..core import (
    FactorizedEmbedding,
    FactorizedLinear,
    attention_forms,
    attention_spectral_init,
    factorized_param_count,
    rank_from_scale,
    rank_scale_for_param_ratio,
    register_attention_forms,
)
from ..core.forms import ATTR as FORMS_ATTR
from .arch import ARCHS, Arch, HeadDims, _set_module, arch_for
from .config import FNLConfig
from .layers import TiedFactorizedHead

FORMAT = 1
CONFIG_KEY = "fnl_config"  # key of the plan in model.config / config.json
# Stored as `attn_implementation` in config.json: plain transformers then refuses to build the model with this
# message (instead of silently re-initializing the factorized layers it does not know).
LOAD_MARKER = ("fnl_transformers checkpoint: load it with fnl_transformers.hf.from_pretrained(path), "
               "or save fnl_transformers.hf.recompose(model) for plain transformers")
_MARKER_ATTR = "attn_implementation"


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
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
    init = "spectral" if config.spectral_init else "random"
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    plan = {"format": FORMAT, "arch": arch.name, "config": config.to_dict(), "attention": {}, "layers": {},
            "params_before": _num_params(model)}
    # plan everything first (every refusal happens here, before the model is touched), then apply
    modules = dict(arch.attention_modules(model))
    plan["attention"] = {name: _attention_entry(model, arch, name, att, config) for name, att in modules.items()}
    after_heads = plan["params_before"] - sum(_attention_params_removed(arch, modules[n], _dims(e))
                                              for n, e in plan["attention"].items())
    plan["layers"] = _layer_entries(model, arch, config, plan["params_before"], after_heads)
    for name, entry in plan["attention"].items():
        entry.update(_apply_attention(arch, modules[name], entry, init))
    for name, entry in plan["layers"].items():
        entry.update(_apply_layer(model, arch, name, entry, init))
    _own_config(model)
    _finish(model, arch, plan, config, tied)
    return model


def _own_config(model: nn.Module) -> None:
    """Give ``model`` (and its submodules, which reference the same object) a private copy of its config, so
    recording the plan never alters another model built from the same config object."""
    shared, own = model.config, copy.deepcopy(model.config)
    for module in model.modules():
        if module.__dict__.get("config") is shared:
            module.config = own


def recompose(model: PreTrainedModel) -> PreTrainedModel:
    """A vanilla copy of a patched ``model``: factor products multiplied out in float32, shrunk heads zero-padded
    back to the original head dim (scores keep the original scaling, so outputs are unchanged). The copy has
    the original architecture's parameter names and shapes: plain ``from_pretrained`` loads its
    ``save_pretrained`` output with no missing or unexpected keys. ``model`` itself is not modified."""
    plan = _plan_of(model)
    arch = ARCHS[plan["arch"]]
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, entry in plan["layers"].items():
            layer = out.get_submodule(name)
            if entry["type"] == "tied_head":
                dense = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
                dense.bias = layer.bias  # the shared output bias parameter, if any
                _set_module(out, name, dense)  # its weight is tied to the input embedding below
            elif entry["type"] == "embedding":
                dense = layer.to_embedding()
                dense.padding_idx = entry["orig_padding_idx"]
                _set_module(out, name, dense)
            elif entry["type"] == "conv1d":
                dense = Conv1D(layer.out_features, layer.in_features).to(layer.U.dtype)
                dense.to(layer.U.device)
                dense.weight.copy_(layer.product().t())
                dense.bias.copy_(layer.bias)
                _set_module(out, name, dense)
            else:
                _set_module(out, name, layer.to_linear())
        for name, entry in plan["attention"].items():
            att = out.get_submodule(name)
            dims = _dims(entry)
            if dims.changed:
                t = {k: None if v is None else v.clone() for k, v in arch.read(att, dims).items()}
                arch.write(att, _pad_back(t, dims), HeadDims(dims.heads, dims.kv_heads, dims.head_dim,
                                                             dims.head_dim, dims.head_dim))
            att.__dict__.pop(FORMS_ATTR, None)
    out.__dict__.pop("_tied_weights_keys", None)
    if any(e["type"] == "tied_head" for e in plan["layers"].values()):
        out.all_tied_weights_keys = out.get_expanded_tied_weights_keys(all_submodels=False)
        out.tie_weights()
    out.config.__dict__.pop(CONFIG_KEY, None)
    out.config.__dict__.pop(_MARKER_ATTR, None)
    out.__dict__.pop("fnl_config", None)
    return out


def get_fnl_config(model: nn.Module) -> FNLConfig:
    """The ``FNLConfig`` a patched model was patched with."""
    return FNLConfig.from_dict(_plan_of(model)["config"])


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(getattr(model, "config", None), CONFIG_KEY, None), dict)


# ----------------------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------------------
def _dims(entry: dict) -> HeadDims:
    return HeadDims(entry["heads"], entry["kv_heads"], entry["head_dim"], entry["qk_head_dim"], entry["ov_head_dim"])


def _attention_entry(model, arch: Arch, name: str, att: nn.Module, config: FNLConfig) -> dict:
    H, G = arch.num_heads(model.config)
    hd = arch.original_head_dim(att, H)
    qk, ov = config.head_dims(hd)
    for what, value in (("QK", qk), ("OV", ov)):
        if value > hd:
            raise ValueError(
                f"{what} head dim {value} does not fit {name}: its heads have {hd} dims and can only shrink; "
                f"choose a head dim in 1..{hd}"
            )
    if arch.rope and qk != hd:
        raise ValueError(
            f"{arch.name} applies rotary position embeddings (RoPE) to queries and keys inside each head, so a "
            f"head's QK product is not one fixed matrix and cannot be truncated by SI; keep the QK head dim "
            f"({hd}): set qk_head_dim=None and shrink only ov_head_dim, or factorize FFN/embeddings"
        )
    if G != H and ov != hd:
        raise ValueError(
            f"{name} uses grouped-query attention ({H} query heads share {G} key/value heads), so per-head OV "
            f"forms do not separate; keep the OV head dim ({hd}) (FD on OV/QK still works)"
        )
    full = arch.read(att, HeadDims(H, G, hd, hd, hd))
    if ov != hd and full["v_bias"] is not None and full["o_bias"] is None:
        raise ValueError(f"{name}: a value bias can only be folded into an output bias, and the output projection "
                         "has none; keep the OV head dim")
    return {"heads": H, "kv_heads": G, "head_dim": hd, "qk_head_dim": qk, "ov_head_dim": ov}


def _apply_attention(arch: Arch, att: nn.Module, entry: dict, init: str) -> dict:
    """Shrink ``att``'s heads to the entry's dims. ``init``: ``spectral`` (per-head SI of the current weights),
    ``random`` (fresh projections for the shrunk forms) or ``skip`` (shapes only; weights are loaded next)."""
    dims = _dims(entry)
    full = HeadDims(dims.heads, dims.kv_heads, dims.head_dim, dims.head_dim, dims.head_dim)
    if not dims.changed:
        return {}
    before = _attention_params(arch, att, full)
    orig = {k: None if v is None else v.clone() for k, v in arch.read(att, full).items()}
    qk_keys = ("q_weight", "q_bias", "k_weight", "k_bias")
    ov_keys = ("v_weight", "v_bias", "o_weight", "o_bias")
    if init == "spectral":
        si = attention_spectral_init(
            *(orig[f"{k}_weight"] for k in "qkvo"), dims.heads, qk_rank=dims.qk, ov_rank=dims.ov,
            **{f"{k}_bias": orig[f"{k}_bias"] for k in "qkvo"},
            num_kv_heads=None if dims.kv_heads == dims.heads else dims.kv_heads,
        )
        t = dict(orig)
        for keys, shrunk in ((qk_keys, dims.qk != dims.head_dim), (ov_keys, dims.ov != dims.head_dim)):
            if shrunk:  # a form kept at full dim is left exactly as it was (RoPE / GQA safe)
                t.update({k: si[k] for k in keys})
    elif init == "random":
        t = dict(orig)
        for keys, shrunk in ((qk_keys, dims.qk != dims.head_dim), (ov_keys, dims.ov != dims.head_dim)):
            if shrunk:
                t.update(dict.fromkeys(keys))
    else:
        t = {}
    arch.write(att, t, dims)
    result = {"qk_params": [before[0], _attention_params(arch, att, dims)[0]],
              "ov_params": [before[1], _attention_params(arch, att, dims)[1]]}
    if init == "spectral":
        new = arch.read(att, dims)
        result["qk_rel_error"] = _rel_error(_qk_products(orig, dims.heads), _qk_products(new, dims.heads))
        result["ov_rel_error"] = _rel_error(_ov_products(orig, dims.heads), _ov_products(new, dims.heads))
    return result


def _attention_params_removed(arch: Arch, att: nn.Module, dims: HeadDims) -> int:
    """Parameters that shrinking the unpatched ``att`` to ``dims`` removes (q/k/v rows, o columns scale with the
    per-head dims; the output bias stays)."""
    full = HeadDims(dims.heads, dims.kv_heads, dims.head_dim, dims.head_dim, dims.head_dim)
    t = arch.read(att, full)
    qk = sum(t[k].numel() for k in ("q_weight", "q_bias", "k_weight", "k_bias") if t[k] is not None)
    ov = sum(t[k].numel() for k in ("v_weight", "v_bias", "o_weight") if t[k] is not None)
    return qk * (dims.head_dim - dims.qk) // dims.head_dim + ov * (dims.head_dim - dims.ov) // dims.head_dim


def _attention_params(arch: Arch, att: nn.Module, dims: HeadDims) -> Tuple[int, int]:
    t = arch.read(att, dims)
    count = lambda keys: sum(t[k].numel() for k in keys if t[k] is not None)  # noqa: E731
    return count(("q_weight", "q_bias", "k_weight", "k_bias")), count(("v_weight", "v_bias", "o_weight", "o_bias"))


def _qk_products(t: dict, heads: int) -> torch.Tensor:
    """Per-head QK forms ``[W_q,h | b_q,h]^T W_k,h`` ((d + 1) x d; the query bias acts on a constant input 1),
    the forms per-head SI approximates (core ``attention_spectral_init``)."""
    f = attention_forms(t["q_weight"], t["k_weight"], t["v_weight"], t["o_weight"], heads,
                        num_kv_heads=t["k_weight"].shape[0] * heads // t["q_weight"].shape[0])["qk"]
    A = f.A.float()
    if t["q_bias"] is not None:
        A = torch.cat([A, t["q_bias"].float().view(heads, 1, -1)], dim=1)
    B = f.B.float().repeat_interleave(heads // f.B.shape[0], dim=0)
    return A @ B.transpose(1, 2)


def _ov_products(t: dict, heads: int) -> torch.Tensor:
    """Per-head OV forms ``W_o,h W_v,h`` (d_out x d)."""
    f = attention_forms(t["q_weight"], t["k_weight"], t["v_weight"], t["o_weight"], heads,
                        num_kv_heads=t["k_weight"].shape[0] * heads // t["q_weight"].shape[0])["ov"]
    B = f.B.float().repeat_interleave(heads // f.B.shape[0], dim=0)
    return f.A.float() @ B.transpose(1, 2)


def _pad_back(t: dict, dims: HeadDims) -> dict:
    """Zero-pad reduced per-head rows (q/k/v, nn.Linear layout) and columns (o) back to the original head dim."""
    hd = dims.head_dim

    def rows(x, heads, r):
        if x is None or r == hd:
            return x
        x = x.reshape(heads, r, *x.shape[1:])
        pad = x.new_zeros(heads, hd - r, *x.shape[2:])
        return torch.cat([x, pad], dim=1).reshape(heads * hd, *x.shape[2:])

    out = dict(t)
    for key, heads, r in (("q", dims.heads, dims.qk), ("k", dims.kv_heads, dims.qk), ("v", dims.kv_heads, dims.ov)):
        out[f"{key}_weight"] = rows(t[f"{key}_weight"], heads, r)
        out[f"{key}_bias"] = rows(t[f"{key}_bias"], heads, r)
    o = t["o_weight"]
    if dims.ov != hd:
        o = o.reshape(o.shape[0], dims.heads, dims.ov)
        o = torch.cat([o, o.new_zeros(o.shape[0], dims.heads, hd - dims.ov)], dim=2).reshape(o.shape[0], -1)
    out["o_weight"] = o
    return out


# ----------------------------------------------------------------------------------------------------------------
# FFN and embedding layers
# ----------------------------------------------------------------------------------------------------------------
def _layer_entries(model, arch: Arch, config: FNLConfig, params_before: int, params_now: int) -> Dict[str, dict]:
    """Plan entries (kind, layout, shape, rank) of every layer to factorize, in application order."""
    candidates = []  # (name, module, kind, type, (m, n))
    if "ffn" in config.factorize:
        for name, layer in arch.ffn_modules(model):
            W, _ = arch.linear_weight(layer)
            candidates.append((name, layer, "linear", "conv1d" if isinstance(layer, Conv1D) else "linear",
                               tuple(W.shape)))
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    tied = out is not None and inp is not None and getattr(out, "weight", None) is inp.weight
    if "embedding" in config.factorize and isinstance(inp, nn.Embedding):
        candidates.append((names[id(inp)], inp, "embedding", "embedding", tuple(inp.weight.shape)))
        if out is not None and not tied and isinstance(out, nn.Linear):
            candidates.append((names[id(out)], out, "embedding", "linear", tuple(out.weight.shape)))

    ranks: Dict[str, Optional[int]] = {}
    used = set()
    for name, *_ in candidates:
        ranks[name] = None
        for pattern, rank in config.ranks.items():
            if fnmatch.fnmatchcase(name, pattern):
                ranks[name] = rank
                used.add(pattern)
                break
    unused = [p for p in config.ranks if p not in used]
    if unused:
        examples = ", ".join(n for n, *_ in candidates[:4]) or "none"
        raise ValueError(
            f"ranks: pattern(s) {unused} match no layer of the parts {list(config.factorize)} "
            f"(layer names look like: {examples})"
        )
    scale = config.rank_scale
    if config.target_param_ratio is not None:
        scale = _scale_for_ratio(candidates, ranks, config, params_before, params_now)
    entries = {}
    for name, layer, kind, type_, (m, n) in candidates:
        rank = ranks[name]
        if rank is None and scale is not None:
            rank = rank_from_scale(m, n, scale)
        if rank is None:
            continue
        entry = {"kind": kind, "type": type_, "shape": [m, n], "rank": rank, "deep": config.deep}
        if type_ == "embedding":
            pad = layer.padding_idx
            # FactorizedEmbedding zeroes the padding row; a pretrained nonzero row would be lost, so such a table
            # is factorized without padding_idx (the row is then approximated and trained like any other)
            keep = pad is not None and not bool(layer.weight[pad].any())
            entry.update(padding_idx=pad if keep else None, orig_padding_idx=pad)
        entries[name] = entry
    emb_name = names.get(id(inp))
    if tied and emb_name in entries:
        entries[names[id(out)]] = {"kind": "embedding", "type": "tied_head", "embedding": emb_name,
                                   "shape": list(inp.weight.shape), "rank": entries[emb_name]["rank"],
                                   "bias": getattr(out, "bias", None) is not None}
    return entries


def _scale_for_ratio(candidates, ranks, config: FNLConfig, params_before: int, now: int) -> float:
    """Rank scale whose factorized model keeps ``target_param_ratio`` of ``params_before`` parameters (core
    ``rank_scale_for_param_ratio`` on a shape-only stand-in of the layers the scale applies to). ``now``: the
    parameter count after head shrinking."""
    scaled = [(m, n) for name, _, _, _, (m, n) in candidates if ranks[name] is None]
    fixed = sum(factorized_param_count(m, n, ranks[name], config.deep) - m * n
                for name, _, _, _, (m, n) in candidates if ranks[name] is not None)
    rest = now + fixed - sum(m * n for m, n in scaled)
    if not scaled:
        raise ValueError("target_param_ratio: every layer has an explicit rank in `ranks`; nothing left to scale")
    stand_in = nn.Module()
    stand_in.layers = nn.ModuleList(nn.Linear(n, m, bias=False, device="meta") for m, n in scaled)
    stand_in.rest = nn.Parameter(torch.empty(rest, device="meta"))
    total = rest + sum(m * n for m, n in scaled)
    target = config.target_param_ratio * params_before
    smallest = rest + sum(factorized_param_count(m, n, 1, config.deep) for m, n in scaled)
    if smallest > target:
        raise ValueError(
            f"target_param_ratio {config.target_param_ratio} is unreachable: rank 1 in every factorized layer "
            f"still keeps {smallest / params_before:.4f} of the parameters; raise the ratio or factorize more parts"
        )
    return rank_scale_for_param_ratio(stand_in, target / total, deep=config.deep)


def _apply_layer(model, arch: Arch, name: str, entry: dict, init: str) -> dict:
    """Replace layer ``name`` by its factorized form (``init``: spectral / random / skip)."""
    layer = model.get_submodule(name)
    rank, deep = entry["rank"], entry.get("deep", False)
    if entry["type"] == "tied_head":
        emb = model.get_submodule(entry["embedding"])
        _set_module(model, name, TiedFactorizedHead(emb, getattr(layer, "bias", None) if entry["bias"] else None))
        return {}
    before = sum(p.numel() for p in layer.parameters())
    if entry["type"] == "embedding":
        W = layer.weight
        if init == "skip":
            new = FactorizedEmbedding(*W.shape, rank, entry["padding_idx"], deep, dtype=W.dtype, device=W.device)
        else:
            saved, layer.padding_idx = layer.padding_idx, entry["padding_idx"]
            try:
                new = FactorizedEmbedding.from_embedding(layer, rank=rank, init=init, deep=deep)
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
            new = FactorizedLinear.from_linear(dense, rank=rank, init=init, deep=deep)
        if entry["kind"] == "embedding":
            new.fd_kind = "embedding"  # an untied output embedding is regularized as an embedding
    result = {"params": [before, sum(p.numel() for p in new.parameters())]}
    if init == "spectral":
        result["rel_error"] = _rel_error(W.detach().float(), new.product())
    _set_module(model, name, new)
    return result


# ----------------------------------------------------------------------------------------------------------------
# bookkeeping
# ----------------------------------------------------------------------------------------------------------------
def _finish(model, arch: Arch, plan: dict, config: FNLConfig, tied: Dict[str, str]) -> None:
    """Register the attention forms, keep tied weights consistent, and record the plan on the model."""
    for name, entry in plan["attention"].items():
        register_attention_forms(model.get_submodule(name), arch.form_specs(_dims(entry)))
    heads = [n for n, e in plan["layers"].items() if e["type"] == "tied_head"]
    if heads:
        # the tied head reads the factorized embedding itself; drop the now meaningless weight tie (keep others,
        # e.g. BERT's decoder bias) so transformers' tie_weights never looks for a dense embedding weight
        emb = plan["layers"][heads[0]]["embedding"]
        mapping = {t: s for t, s in tied.items() if s != f"{emb}.weight" and t != f"{heads[0]}.weight"}
        model._tied_weights_keys = mapping
        model.all_tied_weights_keys = dict(mapping)
    plan["params_after"] = _num_params(model)
    setattr(model.config, CONFIG_KEY, plan)
    setattr(model.config, _MARKER_ATTR, LOAD_MARKER)
    model.fnl_config = config


def _check_unpatched(model) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"patch_model expects a transformers PreTrainedModel, got {type(model).__name__}")
    if is_patched(model):
        raise ValueError("this model is already patched by fnl_transformers; recompose(model) first to re-patch")


def _plan_of(model) -> dict:
    plan = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not isinstance(plan, dict):
        raise ValueError("this model is not patched by fnl_transformers (no config.fnl_config); use patch_model")
    if plan.get("format") != FORMAT or plan.get("arch") not in ARCHS:
        raise ValueError(
            f"fnl_config format {plan.get('format')!r} / arch {plan.get('arch')!r} is not one this fnl_transformers "
            f"reads (format {FORMAT}, archs {sorted(ARCHS)})"
        )
    return plan


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _rel_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``||ref - approx||_F / ||ref||_F`` (0 for an all-zero reference that is matched exactly)."""
    ref, approx = ref.detach().float(), approx.detach().float()
    den = float(ref.norm())
    num = float((ref - approx).norm())
    return num / den if den > 0 else num


def apply_plan(model: PreTrainedModel, plan: dict) -> PreTrainedModel:
    """Rebuild the patched architecture described by ``plan`` on a vanilla ``model`` without computing any
    factor (weights are loaded next). Used by :func:`fnl_transformers.hf.from_pretrained`."""
    _check_unpatched(model)
    arch = arch_for(model)
    if plan.get("arch") != arch.name:
        raise ValueError(f"the saved fnl_config is for {plan.get('arch')!r} but the model is {arch.name!r}")
    config = FNLConfig.from_dict(plan["config"])
    found = {n for n, _ in arch.attention_modules(model)}
    missing = [n for n in list(plan["attention"]) + [n for n in plan["layers"]] if not _has_module(model, n)]
    if missing or set(plan["attention"]) != found:
        raise ValueError(
            f"the saved fnl_config does not match this model's modules (missing: {missing[:3]}); was it saved from "
            "a different architecture or a sub-model?"
        )
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    for name, entry in plan["attention"].items():
        _apply_attention(arch, model.get_submodule(name), entry, "skip")
    # tied heads after their embedding (config.json stores the plan with sorted keys)
    for name, entry in sorted(plan["layers"].items(), key=lambda item: item[1]["type"] == "tied_head"):
        _apply_layer(model, arch, name, entry, "skip")
    _own_config(model)
    _finish(model, arch, copy.deepcopy(plan), config, tied)
    return model


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
