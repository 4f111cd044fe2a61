"""``fnl_transformer``: fairseq's ``transformer`` with factorized FFN / embedding layers, SI, and reduced heads.

Paper: Khodak, Tenenholtz, Mackey, Fusi, ICLR 2021: Sec. 2 (factorized layers, rank scale), Sec. 3.1 (spectral
initialization), Sec. 4 (attention QK / OV forms, reduced head dimension), Sec. 5 (overcomplete "deep" factors).

How the model is built: exactly as fairseq's ``transformer`` (same modules, same random numbers), then
transformed in place: FFN ``fc1``/``fc2`` and the token embeddings become
:class:`~fnl_transformers.core.FactorizedLinear` / :class:`~fnl_transformers.core.FactorizedEmbedding`
(``--rank-scale``), SI (``--spectral-init``) factorizes the dense initialization, and attention heads shrink
(``--head-dim``) with or without per-head SI. With every option off the model IS fairseq's ``transformer``
(same parameters, names, outputs and training trajectory).

Options (``fairseq-train --arch fnl_transformer* ...``):

* ``--rank-scale R``: factorize the parts named by ``--factorize`` (default ``ffn,embeddings``) at rank
  ``round(R * min(m, n))`` per layer; ``R < 1`` compresses, ``R >= 1`` is overcomplete.
* ``--factorize PARTS``: comma list of ``ffn`` (``fc1``, ``fc2`` of every layer) and ``embeddings`` (token
  embeddings and, when not tied, the decoder output projection).
* ``--deep``: ``U M V^T`` factors (``M`` starts at the identity): overcomplete training, multiplied out after
  training by ``fnl recompose`` (teacher-free distillation).
* ``--spectral-init``: SI of the factorized layers (else fresh random factors).
* ``--head-dim D`` / ``--head-dim-qk D`` / ``--head-dim-ov D``: per-head dimension of the QK and OV forms of
  every attention (encoder self, decoder self, cross); ``--head-dim`` sets both, the others override it.
* ``--spectral-init-qk`` / ``--spectral-init-ov``: per-head SI of the QK / OV forms (at the reduced head dim,
  or at full dim where they only balance the factors; exact there: key bias dropped, value bias folded).

Parameter names (fairseq's, plus the factors; ``*`` is ``encoder`` or ``decoder``, ``i`` the layer):

* ``*.layers.i.fc1.U`` (ffn x r), ``.V`` (d x r), ``.M`` (r x r, ``--deep`` only), ``.bias`` (ffn);
  ``*.layers.i.fc2.U`` (d x r), ``.V`` (ffn x r), ``.M``, ``.bias`` (d). Dense weight: ``U M V^T``
  (``FactorizedLinear.product()``); the rank of a layer is ``U.shape[1]``.
* ``*.embed_tokens.U`` (vocab x r), ``.V`` (d x r), ``.M``; dense table ``U M V^T``, padding row of ``U`` zero.
  With ``--share-all-embeddings`` both keys hold the same tensors (as fairseq's dense ``embed_tokens.weight``).
  Tied output projection (``--share-decoder-input-output-embed`` / ``--share-all-embeddings``): logits
  ``((x V) M^T) U^T`` of ``decoder.embed_tokens``, no ``decoder.output_projection.*`` parameter. Untied:
  ``decoder.output_projection.U`` (vocab x r), ``.V`` (d x r), ``.M`` (FD kind ``embedding``, no bias).
* Attention (``*.layers.i.self_attn`` and ``decoder.layers.i.encoder_attn``): ``q_proj.weight``,
  ``k_proj.weight`` ``(heads * head_dim_qk) x d_in``, ``v_proj.weight`` ``(heads * head_dim_ov) x d_in``,
  ``out_proj.weight`` ``d x (heads * head_dim_ov)``, biases of matching size. Scores are scaled by the
  ORIGINAL ``1/sqrt(embed_dim / heads)``, so zero-padding the per-head rows / columns back to
  ``embed_dim / heads`` gives the dense ``transformer`` computing the same function.

Recorded in the model args (``cfg["model"]`` of a checkpoint) for ``fnl recompose``: ``rank_scale``,
``factorize``, ``deep``, ``head_dim_qk``/``head_dim_ov`` (resolved; ``None`` = full), and fairseq's own
``encoder_embed_dim``, ``decoder_embed_dim``, ``encoder_ffn_embed_dim``, ``decoder_ffn_embed_dim``,
``encoder_attention_heads``, ``decoder_attention_heads`` (the original dims), ``share_*`` flags.

FD bookkeeping: the model records the criterion's FD coefficients (``--fd-qk``, ``--fd-ov``, ``--fd-linear``,
``--fd-embedding``) at build time; :meth:`FnlTransformerModel.fd_parameters` lists the factors they decay, which
the plugin's optimizers (``fnl_adam``, ``flambe``, ``fnl_lamb``) keep out of ``--weight-decay``.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from fairseq.models.transformer import (
    TransformerModel,
    base_architecture,
    transformer_iwslt_de_en,
    transformer_wmt_en_de,
)
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import nn

from ..core import FactorizedEmbedding, FactorizedLinear, KINDS, form_parameters
from ..core.rank import check_rank_scale
from .attention import register_fairseq_attention_forms, reduce_attention

PARTS = ("ffn", "embeddings")
# optimizers of this plugin: they keep factors decayed by the criterion's FD out of --weight-decay
FD_AWARE_OPTIMIZERS = ("fnl_adam", "flambe", "fnl_lamb")

# models built in this process (weakly held): the plugin's optimizers find the model of the parameters
# fairseq hands them (fairseq passes a flat parameter list, no names)
LIVE_MODELS: "weakref.WeakSet[FnlTransformerModel]" = weakref.WeakSet()


def add_fnl_args(parser) -> None:
    g = parser.add_argument_group("fnl_transformers (factorized layers, SI, reduced heads)")
    g.add_argument("--rank-scale", type=float, metavar="R",
                   help="factorize the --factorize parts at rank round(R * min(m, n)) (R < 1 compresses, "
                        "R >= 1 is overcomplete); default: no factorization")
    g.add_argument("--factorize", type=str, metavar="PARTS",
                   help="comma list of parts --rank-scale factorizes: ffn, embeddings (default: ffn,embeddings)")
    g.add_argument("--deep", action="store_true",
                   help="U M V^T factors (M starts at the identity): overcomplete training, multiply out after "
                        "training with `fnl recompose`")
    g.add_argument("--spectral-init", action="store_true",
                   help="spectral initialization of the factorized layers (else random factors)")
    g.add_argument("--spectral-init-qk", action="store_true", help="per-head SI of the attention QK forms")
    g.add_argument("--spectral-init-ov", action="store_true", help="per-head SI of the attention OV forms")
    g.add_argument("--head-dim", type=int, metavar="D", help="per-head dim of the QK and OV forms (all attentions)")
    g.add_argument("--head-dim-qk", type=int, metavar="D", help="per-head dim of the QK forms (overrides --head-dim)")
    g.add_argument("--head-dim-ov", type=int, metavar="D", help="per-head dim of the OV forms (overrides --head-dim)")


def fnl_defaults(args) -> None:
    """Defaults of the fnl options (every architecture calls this after fairseq's own defaults)."""
    for name, default in (("rank_scale", None), ("factorize", None), ("deep", False), ("spectral_init", False),
                          ("spectral_init_qk", False), ("spectral_init_ov", False), ("head_dim", None),
                          ("head_dim_qk", None), ("head_dim_ov", None)):
        if getattr(args, name, None) is None:
            setattr(args, name, default)


@dataclass(frozen=True)
class FnlSettings:
    rank_scale: Optional[float] = None
    factorize: Tuple[str, ...] = PARTS
    deep: bool = False
    spectral_init: bool = False
    spectral_init_qk: bool = False
    spectral_init_ov: bool = False
    head_dim_qk: Optional[int] = None
    head_dim_ov: Optional[int] = None

    @classmethod
    def from_args(cls, args) -> "FnlSettings":
        """Validated settings; one clear ValueError per bad option."""
        rank_scale = getattr(args, "rank_scale", None)
        if rank_scale is not None:
            rank_scale = check_rank_scale(rank_scale, "--rank-scale")
        raw = getattr(args, "factorize", None)
        parts = PARTS if raw is None else tuple(p.strip() for p in str(raw).split(",") if p.strip())
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise ValueError(f"--factorize must be a comma list of {', '.join(PARTS)}, got {raw!r}")
        deep, si = bool(getattr(args, "deep", False)), bool(getattr(args, "spectral_init", False))
        if rank_scale is None and (deep or si or raw is not None):
            used = [f for f, on in (("--deep", deep), ("--spectral-init", si), ("--factorize", raw is not None)) if on]
            raise ValueError(f"{', '.join(used)} needs --rank-scale R (which layers to factorize at which rank)")
        head_dim = getattr(args, "head_dim", None)
        dims = {}
        for kind in ("qk", "ov"):
            d = getattr(args, f"head_dim_{kind}", None)
            d = head_dim if d is None else d
            if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
                raise ValueError(f"--head-dim-{kind} must be a positive integer, got {d!r}")
            dims[kind] = d
        return cls(rank_scale, parts, deep, si, bool(getattr(args, "spectral_init_qk", False)),
                   bool(getattr(args, "spectral_init_ov", False)), dims["qk"], dims["ov"])

    @property
    def factorizes(self) -> bool:
        return self.rank_scale is not None

    @property
    def touches_attention(self) -> bool:
        return (self.head_dim_qk is not None or self.head_dim_ov is not None or self.spectral_init_qk
                or self.spectral_init_ov)


def criterion_fd(args) -> Dict[str, float]:
    """The FD coefficients of the fd_label_smoothed_cross_entropy criterion, from the full args."""
    if getattr(args, "criterion", None) != "fd_label_smoothed_cross_entropy":
        return {k: 0.0 for k in KINDS}
    linear = float(getattr(args, "fd_linear", 0.0) or 0.0)
    emb = getattr(args, "fd_embedding", None)
    return {"linear": linear, "embedding": linear if emb is None else float(emb),
            "qk": float(getattr(args, "fd_qk", 0.0) or 0.0), "ov": float(getattr(args, "fd_ov", 0.0) or 0.0)}


class TiedFactorizedProjection(nn.Module):
    """Decoder output projection tied to a factorized embedding: logits ``x E^T = ((x V) M^T) U^T``.

    Holds the embedding without registering it (it is ``decoder.embed_tokens``), so it owns no parameter and
    the state dict has no ``output_projection`` key."""

    def __init__(self, embedding: FactorizedEmbedding):
        super().__init__()
        self.__dict__["embedding"] = embedding  # not a submodule: the parameters live in embed_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.project(x)

    def extra_repr(self) -> str:
        return "tied to decoder.embed_tokens: x V M^T U^T"


def _check_model_options(args, s: FnlSettings) -> None:
    if s.factorizes and "embeddings" in s.factorize and getattr(args, "adaptive_softmax_cutoff", None):
        raise ValueError("--adaptive-softmax-cutoff is not supported with factorized embeddings; "
                         "use --factorize ffn or drop the adaptive softmax")
    if (s.factorizes or s.touches_attention) and (getattr(args, "quant_noise_pq", 0) or 0) > 0:
        raise ValueError("--quant-noise-pq is not supported with fnl options (it wraps the dense layers); set it to 0")
    if s.head_dim_qk is not None or s.head_dim_ov is not None:
        for flag in ("cross_self_attention", "scale_heads", "adaptive_input"):
            if getattr(args, flag, False):
                raise ValueError(f"--{flag.replace('_', '-')} is not supported with --head-dim; drop one of them")


def _factorize_layer(linear: nn.Linear, s: FnlSettings) -> FactorizedLinear:
    init = "spectral" if s.spectral_init else "random"
    return FactorizedLinear.from_linear(linear, rank_scale=s.rank_scale, init=init, deep=s.deep)


def _factorize_embedding(emb: nn.Embedding, s: FnlSettings) -> FactorizedEmbedding:
    init = "spectral" if s.spectral_init else "random"
    return FactorizedEmbedding.from_embedding(emb, rank_scale=s.rank_scale, init=init, deep=s.deep)


def apply_settings(model: TransformerModel, s: FnlSettings) -> None:
    """Transform a freshly built dense ``transformer`` in place (see the module docstring)."""
    layers = list(model.encoder.layers) + list(model.decoder.layers)
    if s.factorizes and "ffn" in s.factorize:
        for layer in layers:
            layer.fc1 = _factorize_layer(layer.fc1, s)
            layer.fc2 = _factorize_layer(layer.fc2, s)
    if s.factorizes and "embeddings" in s.factorize:
        enc, dec = model.encoder.embed_tokens, model.decoder.embed_tokens
        new_enc = _factorize_embedding(enc, s)
        new_dec = new_enc if dec is enc else _factorize_embedding(dec, s)
        model.encoder.embed_tokens, model.decoder.embed_tokens = new_enc, new_dec
        if model.decoder.share_input_output_embed:
            model.decoder.output_projection = TiedFactorizedProjection(new_dec)
        else:
            proj = _factorize_layer(model.decoder.output_projection, s)
            proj.fd_kind = "embedding"  # the output embedding table (FD kind of this one layer)
            model.decoder.output_projection = proj
    if s.touches_attention:
        for name, module in list(model.named_modules()):
            if isinstance(module, MultiheadAttention):
                reduce_attention(module, s.head_dim_qk, s.head_dim_ov, s.spectral_init_qk, s.spectral_init_ov,
                                 name=name)
    for module in model.modules():
        if isinstance(module, MultiheadAttention):
            register_fairseq_attention_forms(module)


class FnlTransformerModel(TransformerModel):
    """fairseq ``transformer`` with factorized layers, SI and reduced heads (see the module docstring)."""

    @classmethod
    def hub_models(cls):
        return {}

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_fnl_args(parser)

    @classmethod
    def build_model(cls, args, task):
        fnl_defaults(args)
        settings = FnlSettings.from_args(args)
        _check_model_options(args, settings)
        model = super().build_model(args, task)  # dense, the same random numbers as `transformer`
        apply_settings(model, settings)
        # recorded for `fnl recompose` (the args are saved as cfg["model"] of each checkpoint)
        args.head_dim_qk, args.head_dim_ov = settings.head_dim_qk, settings.head_dim_ov
        if settings.factorizes:
            args.factorize = ",".join(settings.factorize)
        model.fnl_settings = settings
        model.fnl_criterion_fd = criterion_fd(args)
        model.fnl_num_updates = 0
        _check_optimizer(model, args)
        LIVE_MODELS.add(model)
        return model

    def fd_parameters(self) -> List[Tuple[str, nn.Parameter, str]]:
        """``(name, parameter, kind)`` of the factors decayed by the criterion's FD (kept out of weight decay)."""
        active = [k for k, v in self.fnl_criterion_fd.items() if v > 0]
        return form_parameters(self, active) if active else []

    def set_num_updates(self, num_updates):
        self.fnl_num_updates = num_updates  # read by the criterion for --form-diagnostics-interval
        super().set_num_updates(num_updates)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        try:
            return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)
        except RuntimeError as exc:
            own = self.state_dict()
            missing = sorted(set(own) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(own))
            shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
                      if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
            if not (missing or unexpected or shapes):
                raise
            show = lambda xs: ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")  # noqa: E731
            parts = [f"{label}: {show(xs)}" for label, xs in (("missing", missing), ("unexpected", unexpected),
                                                                ("checkpoint vs model shape", shapes)) if xs]
            raise ValueError(
                "checkpoint does not match this fnl_transformer configuration (" + "; ".join(parts) + "); build the "
                "model with the options it was trained with (--rank-scale, --factorize, --deep, --head-dim*, "
                "--share-*), which are stored in the checkpoint's cfg['model']"
            ) from exc


def _check_optimizer(model: FnlTransformerModel, args) -> None:
    """FD replaces weight decay on the factors it decays: refuse optimizers that would apply both."""
    if not model.fd_parameters():
        return
    optimizer = getattr(args, "optimizer", None)
    wd = float(getattr(args, "weight_decay", 0.0) or 0.0)
    if optimizer is not None and optimizer not in FD_AWARE_OPTIMIZERS and wd > 0:
        active = [f"--fd-{k}" for k, v in model.fnl_criterion_fd.items() if v > 0]
        raise ValueError(
            f"{', '.join(active)} replaces weight decay on the factors it decays, but --optimizer {optimizer} applies "
            f"--weight-decay {wd:g} to every parameter. Use --optimizer fnl_adam (fairseq's adam without weight "
            "decay on those factors), flambe or fnl_lamb, or set --weight-decay 0"
        )
    flat_fp16 = (getattr(args, "fp16", False) or getattr(args, "bf16", False)) and not (
        getattr(args, "memory_efficient_fp16", False) or getattr(args, "memory_efficient_bf16", False))
    if optimizer in FD_AWARE_OPTIMIZERS and wd > 0 and flat_fp16:
        raise ValueError(
            "--fp16/--bf16 copies all parameters into one flat buffer, so the optimizer cannot keep FD factors out of "
            "--weight-decay; use --memory-efficient-fp16 (or --memory-efficient-bf16)"
        )


def fnl_base_architecture(args):
    base_architecture(args)
    fnl_defaults(args)


def fnl_transformer_iwslt_de_en(args):
    transformer_iwslt_de_en(args)
    fnl_defaults(args)


def fnl_transformer_wmt_en_de(args):
    transformer_wmt_en_de(args)
    fnl_defaults(args)


def fnl_transformer_tiny(args):
    """For tests and smoke runs: d = 32, FFN 64, 4 heads of dim 8, 2 + 2 layers."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 32)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 64)
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", args.encoder_embed_dim)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", args.encoder_ffn_embed_dim)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    fnl_base_architecture(args)


ARCHITECTURES = {
    "fnl_transformer": fnl_base_architecture,
    "fnl_transformer_iwslt_de_en": fnl_transformer_iwslt_de_en,
    "fnl_transformer_wmt_en_de": fnl_transformer_wmt_en_de,
    "fnl_transformer_tiny": fnl_transformer_tiny,
}
