"""The plan of a patch: every decision (head dims and their initialization, ranks, padding index) as typed
records, computed once from shapes before the model is touched, and stored as JSON in ``config.json``.

:func:`make_plan` reads each attention module's weights once (returned beside the plan for
:mod:`~fnl_transformers.hf.apply`); parameter counts come from shapes (core
:func:`~fnl_transformers.core.form_param_counts`), ranks from core :func:`~fnl_transformers.core.plan_ranks`
(rank scale, per-module ranks, or a parameter budget). Every refusal happens here.

``Plan.to_dict`` / ``Plan.from_dict`` round-trip through JSON; plans of the previous format (1: head-dim keys
``qk_head_dim``/``ov_head_dim``) are read and upgraded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional, Tuple

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core import HeadDims, form_param_counts, plan_ranks
from ..core.heads import Tensors
from ..core.settings import HEAD_FORMS
from .arch import ARCHS, Arch, arch_for
from .config import FNLConfig

FORMAT = 2
FORMATS_READ = (1, 2)


@dataclass
class AttentionEntry:
    """One attention module: its heads, QK/OV dims, how each form starts, and what patching measured."""

    heads: int
    kv_heads: int
    head_dim: int
    head_dim_qk: int
    head_dim_ov: int
    init_qk: Optional[str] = None  # "spectral" | "random" | "balanced" | None (left as it is)
    init_ov: Optional[str] = None
    score_dim: Optional[int] = None  # scores scaled by 1/sqrt(score_dim) (None: the original head_dim)
    qk_params: Optional[List[int]] = None  # [before, after]
    ov_params: Optional[List[int]] = None
    qk_rel_error: Optional[float] = None  # ||P - P_r||_F / ||P||_F over all heads (spectral / activation init)
    ov_rel_error: Optional[float] = None
    qk_fit: Optional[Dict[str, float]] = None  # activation init: core FitErrors (minimized, output, weight errors)
    ov_fit: Optional[Dict[str, float]] = None

    @property
    def dims(self) -> HeadDims:
        return HeadDims(self.heads, self.kv_heads, self.head_dim, self.head_dim_qk, self.head_dim_ov)

    @property
    def touched(self) -> bool:
        """Whether patching rewrites the module (heads resized, or a form re-initialized at full dim)."""
        return self.dims.changed or self.init_qk is not None or self.init_ov is not None

    @property
    def score_factor(self) -> float:
        """The score scaling used over the model's own: ``sqrt(head_dim / score_dim)`` (1 by default)."""
        return 1.0 if self.score_dim is None else (self.head_dim / self.score_dim) ** 0.5


@dataclass
class LayerEntry:
    """One FFN / embedding layer to factorize (``type``: linear, conv1d, embedding, or tied_head: the output
    projection tied to the factorized input embedding ``embedding``)."""

    kind: str  # FD kind: linear | embedding
    type: str
    shape: List[int]
    rank: int
    deep: bool = False
    padding_idx: Optional[int] = None
    orig_padding_idx: Optional[int] = None
    embedding: Optional[str] = None
    bias: Optional[bool] = None
    params: Optional[List[int]] = None  # [before, after]
    rel_error: Optional[float] = None  # ||W - W'||_F / ||W||_F (spectral / activation init)
    fit: Optional[Dict[str, float]] = None  # activation init: core FitErrors (minimized, output, weight errors)


@dataclass
class Plan:
    arch: str
    config: FNLConfig
    attention: Dict[str, AttentionEntry] = field(default_factory=dict)
    layers: Dict[str, LayerEntry] = field(default_factory=dict)
    params_before: int = 0
    params_after: Optional[int] = None
    format: int = FORMAT
    fidelity: Optional[dict] = None  # output-level comparison with the original (hf.fidelity), when measured

    def to_dict(self) -> dict:
        out = {
            "format": self.format,
            "arch": self.arch,
            "config": self.config.to_dict(),
            "attention": {n: asdict(e) for n, e in self.attention.items()},
            "layers": {n: asdict(e) for n, e in self.layers.items()},
            "params_before": self.params_before,
            "params_after": self.params_after,
        }
        if self.fidelity is not None:
            out["fidelity"] = self.fidelity
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if not isinstance(data, dict) or data.get("format") not in FORMATS_READ or data.get("arch") not in ARCHS:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            arch = data.get("arch") if isinstance(data, dict) else None
            raise ValueError(
                f"fnl_config format {got!r} / arch {arch!r} is not one this fnl_transformers reads (formats "
                f"{list(FORMATS_READ)}, archs {sorted(ARCHS)})"
            )
        config = FNLConfig.from_dict(data["config"])
        attention = {}
        for name, e in data["attention"].items():
            e = dict(e)
            if data["format"] == 1:  # former key names; the initialization followed spectral_init
                e["head_dim_qk"], e["head_dim_ov"] = e.pop("qk_head_dim"), e.pop("ov_head_dim")
                init = "spectral" if config.spectral_init else "random"
                e["init_qk"] = init if e["head_dim_qk"] != e["head_dim"] else None
                e["init_ov"] = init if e["head_dim_ov"] != e["head_dim"] else None
            attention[name] = AttentionEntry(**_known(AttentionEntry, e, name))
        layers = {name: LayerEntry(**_known(LayerEntry, e, name)) for name, e in data["layers"].items()}
        return cls(
            data["arch"],
            config,
            attention,
            layers,
            data.get("params_before", 0),
            data.get("params_after"),
            fidelity=data.get("fidelity"),
        )


def _known(cls, entry: dict, name: str) -> dict:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(
            f"fnl_config entry {name!r} has unknown field(s) {unknown} (saved by another fnl_transformers version?)"
        )
    return entry


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------- attention
def _qk_cause(config: FNLConfig, qk: int) -> Tuple[str, str]:
    """``(what the user set that changes the QK heads, how to keep them)``, in FNLConfig's names."""
    if config.head_dim_qk is not None:
        return f"head_dim_qk={config.head_dim_qk}", "drop head_dim_qk (head_dim_ov shrinks the OV forms alone)"
    if config.head_dim is not None:
        return (
            f"head_dim={config.head_dim} (both attention forms)",
            f"give head_dim_ov={config.head_dim} instead to shrink the OV forms alone",
        )
    if "attention" in config.factorize and config.rank_scale is not None:
        return (
            f"rank_scale={config.rank_scale:g} with 'attention' in factorize (QK heads to {qk} dims)",
            "drop 'attention' from factorize (head_dim_ov shrinks the OV forms alone)",
        )
    return "spectral_init_qk=True", "drop spectral_init_qk"


def _attention_entry(
    arch: Arch, name: str, att: nn.Module, heads: Tuple[int, int], config: FNLConfig
) -> Tuple[AttentionEntry, Tensors]:
    structure = config.structure
    H, G = heads
    hd = arch.original_head_dim(att, H)
    qk, ov = structure.head_dims(hd, where=name)
    dims = HeadDims(H, G, hd, qk, ov)
    init = {form: structure.head_init(form, dims.shrinks(form)) for form in HEAD_FORMS}
    if arch.rope and (qk != hd or init["qk"] is not None):
        cause, fix = _qk_cause(config, qk)
        raise ValueError(
            f"{arch.name} applies rotary position embeddings (RoPE) to queries and keys inside each head, so a "
            f"head's QK product is not one fixed matrix and cannot be truncated or re-initialized by SI; "
            f"{cause} changes the QK heads ({hd} dims): {fix}, or factorize FFN/embeddings"
        )
    if G != H and (dims.changed or any(init.values())):
        raise ValueError(
            f"{name} uses grouped-query attention ({H} query heads share {G} key/value heads), so per-head OV "
            f"forms do not separate; keep the OV head dim ({hd}) and per-head SI off (FD on OV/QK still works)"
        )
    t = arch.read(att, dims.full)  # the one read of this module's weights
    if (ov != hd or init["ov"] == "spectral") and t["v_bias"] is not None and t["o_bias"] is None:
        raise ValueError(
            f"{name}: a value bias can only be folded into an output bias, and the output projection "
            "has none; keep the OV head dim and spectral_init_ov unset"
        )
    before, after = form_param_counts(t, dims.full), form_param_counts(t, dims)
    score = structure.score_head_dim(hd, qk)
    entry = AttentionEntry(
        H,
        G,
        hd,
        qk,
        ov,
        init["qk"],
        init["ov"],
        None if score == hd else score,
        [before["qk"], after["qk"]],
        [before["ov"], after["ov"]],
    )
    return entry, t


# ------------------------------------------------------------------------------------------------- layers
def _layer_candidates(model: nn.Module, arch: Arch, factorize) -> Tuple[list, dict]:
    """``[(name, module, kind, type, (m, n))]`` of the layers of the parts in ``factorize``, and tie info."""
    candidates = []
    if "ffn" in factorize:
        for name, layer in arch.ffn_modules(model):
            W, _ = arch.linear_weight(layer)
            candidates.append(
                (name, layer, "linear", "conv1d" if isinstance(layer, Conv1D) else "linear", tuple(W.shape))
            )
    if "position" in factorize:
        found = arch.position_modules(model)
        if not found:
            why = "rotary position embeddings (RoPE) act inside the heads" if arch.rope else "no position table found"
            raise ValueError(
                f"factorize 'position' needs learned position embeddings, but {arch.name} has none "
                f"({why}); drop 'position' from factorize"
            )
        for name, table in found:
            if not isinstance(table, nn.Embedding) or not table.weight.requires_grad:
                raise ValueError(
                    f"{name} is a fixed (e.g. sinusoidal) position table, not a learned one: drop "
                    "'position' from factorize"
                )
            candidates.append((name, table, "embedding", "embedding", tuple(table.weight.shape)))
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    tied = out is not None and inp is not None and getattr(out, "weight", None) is inp.weight
    if "embedding" in factorize and isinstance(inp, nn.Embedding):
        candidates.append((names[id(inp)], inp, "embedding", "embedding", tuple(inp.weight.shape)))
        if out is not None and not tied and isinstance(out, nn.Linear):
            candidates.append((names[id(out)], out, "embedding", "linear", tuple(out.weight.shape)))
    tie = {
        "input": names.get(id(inp)),
        "output": names.get(id(out)) if out is not None else None,
        "tied": tied,
        "bias": getattr(out, "bias", None) is not None,
        "shape": list(inp.weight.shape) if tied else None,
    }
    return candidates, tie


def _layer_entries(model, arch: Arch, structure, params_before: int, params_now: int) -> Dict[str, LayerEntry]:
    candidates, tie = _layer_candidates(model, arch, structure.factorize if structure.factorizes else ())
    ranks = plan_ranks([(name, m, n) for name, _, _, _, (m, n) in candidates], structure, params_before, params_now)
    entries = {}
    for name, layer, kind, type_, (m, n) in candidates:
        if name not in ranks:
            continue
        entry = LayerEntry(kind, type_, [m, n], ranks[name], structure.deep)
        if type_ == "embedding":
            pad = layer.padding_idx
            # FactorizedEmbedding zeroes the padding row; a pretrained nonzero row would be lost, so such a table
            # is factorized without padding_idx (the row is then approximated and trained like any other)
            keep = pad is not None and not bool(layer.weight[pad].any())
            entry.padding_idx, entry.orig_padding_idx = (pad if keep else None), pad
        entries[name] = entry
    if tie["tied"] and tie["input"] in entries:
        entries[tie["output"]] = LayerEntry(
            "embedding", "tied_head", tie["shape"], entries[tie["input"]].rank, embedding=tie["input"], bias=tie["bias"]
        )
    return entries


def make_plan(model: nn.Module, config: FNLConfig) -> Tuple[Plan, Dict[str, Tensors]]:
    """The plan of patching ``model`` with ``config``, and each attention module's weights (read once,
    ``nn.Linear`` layout, full heads) for applying it. Raises before anything is changed."""
    arch = arch_for(model)
    structure = config.structure
    heads = arch.num_heads(model.config)
    plan = Plan(arch.name, config, params_before=num_params(model))
    weights: Dict[str, Tensors] = {}
    for name, att in arch.attention_modules(model):
        plan.attention[name], weights[name] = _attention_entry(arch, name, att, heads, config)
    after_heads = plan.params_before - sum(
        e.qk_params[0] - e.qk_params[1] + e.ov_params[0] - e.ov_params[1] for e in plan.attention.values()
    )
    plan.layers = _layer_entries(model, arch, structure, plan.params_before, after_heads)
    return plan, weights
