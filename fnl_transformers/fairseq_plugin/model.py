"""``fnl_transformer``: fairseq's ``transformer`` with factorized FFN / embedding layers, SI, and reduced heads.

Paper: Khodak, Tenenholtz, Mackey, Fusi, ICLR 2021: Sec. 2 (factorized layers, rank scale), Definition 3.1
(spectral initialization), Definition 3.2 (Frobenius decay), Sec. 2.3, Eq. (1) (attention QK / OV forms, reduced
head dimension), Sec. 5 (overcomplete "deep" factors), Sec. 6 and Figure 4 (the IWSLT-14 Transformer).

How the model is built: exactly as fairseq's ``transformer`` (same modules, same random numbers), then the dense
model's options of :mod:`.dense` (``--no-projection-bias`` drops the attention / FFN biases, ``--dense-init paper``
re-initializes it as the official ``transformer_small``), then transformed in place: attention heads shrink
(per-head SI, fresh projections, or fresh projections re-balanced: core :func:`~fnl_transformers.core.shrink_heads`),
and FFN ``fc1``/``fc2``, the token embeddings, learned positional embeddings (part ``position``) and an untied output
projection become :class:`~fnl_transformers.core.FactorizedLinear` / :class:`~fnl_transformers.core.FactorizedEmbedding`
(:class:`.dense.FactorizedPositionalEmbedding`) at the ranks of core :func:`~fnl_transformers.core.plan_ranks` (SI
factorizes the dense initialization; ``--factor-init dense`` draws each factor from it). With every option off
the model IS fairseq's ``transformer`` (same parameters, names, outputs and training trajectory).
``fnl_transformer_small`` is the paper's IWSLT-14 model (the official ``transformer_small``).

Options: one model flag per core setting (:func:`fnl_transformers.core.flat_settings`; ``--`` + the setting's name
with dashes, the names of ``FNLConfig``), converted to the core specs by :func:`fnl_specs`, which validate and
default them (one clear error per bad option, spelled as the flag): ``--rank-scale --factorize --ranks
--target-param-ratio --head-dim --head-dim-qk --head-dim-ov --spectral-init/--no-spectral-init
--spectral-init-qk/--no-spectral-init-qk --spectral-init-ov/--no-spectral-init-ov --factor-init --reduced-heads
--deep --fd-linear --fd-embedding --fd-qk --fd-ov --fd-mode --weight-decay-factors/--no-weight-decay-factors``.
``ARCHITECTURE.md`` has the table; the options of the dense model (``--projection-bias``, ``--dense-init``) are
:mod:`.dense`'s.

The model holds the one FD spec (``model.fnl_fd``, :class:`~fnl_transformers.core.FDSpec`): the criterion
``fd_label_smoothed_cross_entropy`` reads it (coupled FD), and the build sets each parameter's decay (the core
:class:`~fnl_transformers.core.DecayPolicy`) in ``p.optim_overrides["fnl"]`` (with its form memberships for
decoupled FD), which the plugin's optimizers (``fnl_adam``, ``flambe``, ``fnl_lamb``) read from whatever parameter
list fairseq hands them (fairseq copies ``optim_overrides`` onto per-parameter fp32 master copies; mixed precision:
:mod:`fnl_transformers.fairseq_plugin.precision`). The build refuses inconsistent combinations once, each with one
line naming the fix.

Parameter names (fairseq's, plus the factors; ``*`` is ``encoder`` or ``decoder``, ``i`` the layer):

* ``*.layers.i.fc1.U`` (ffn x r), ``.V`` (d x r), ``.M`` (r x r, ``--deep`` only), ``.bias`` (ffn);
  ``*.layers.i.fc2.U`` (d x r), ``.V`` (ffn x r), ``.M``, ``.bias`` (d). Dense weight: ``U M V^T``
  (``FactorizedLinear.product()``); the rank of a layer is ``U.shape[1]``.
* ``*.embed_tokens.U`` (vocab x r), ``.V`` (d x r), ``.M``; dense table ``U M V^T``, padding row of ``U`` zero;
  ``*.embed_positions.U`` (positions + padding offset x r), ``.V``, ``.M`` likewise (part ``position``).
  With ``--share-all-embeddings`` both keys hold the same tensors (as fairseq's dense ``embed_tokens.weight``).
  Tied output projection (``--share-decoder-input-output-embed`` / ``--share-all-embeddings``): logits
  ``((x V) M^T) U^T`` of ``decoder.embed_tokens``, no ``decoder.output_projection.*`` parameter. Untied:
  ``decoder.output_projection.U`` (vocab x r), ``.V`` (d x r), ``.M`` (FD kind ``embedding``, no bias).
* Attention (``*.layers.i.self_attn`` and ``decoder.layers.i.encoder_attn``): ``q_proj.weight``,
  ``k_proj.weight`` ``(heads * head_dim_qk) x d_in``, ``v_proj.weight`` ``(heads * head_dim_ov) x d_in``,
  ``out_proj.weight`` ``d x (heads * head_dim_ov)``, biases of matching size (none with
  ``--no-projection-bias``). Scores are scaled by the ORIGINAL ``1/sqrt(embed_dim / heads)`` (``--reduced-heads
  truncate``, the default) or by ``1/sqrt(head_dim_qk)`` (``fresh``); zero-padding the per-head rows / columns
  back to ``embed_dim / heads``, with the scaling ratio folded into the query, gives the dense ``transformer``
  computing the same function.

The options are recorded in the model args (``cfg["model"]`` of a checkpoint, ``factorize`` normalized) with
fairseq's own ``encoder_embed_dim``, ``..._ffn_embed_dim``, ``..._attention_heads`` and ``share_*`` flags: the
same rules rebuild the same shapes (``fnl recompose``, ``fairseq-generate``).
"""

from __future__ import annotations

import argparse
from typing import List, Tuple

import torch
from fairseq.models.transformer import (
    TransformerModel,
    base_architecture,
    transformer_iwslt_de_en,
    transformer_wmt_en_de,
)
from fairseq.modules import LearnedPositionalEmbedding
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import nn

from ..core import (
    FD,
    WEIGHT_DECAY,
    DecayPolicy,
    FactorizedEmbedding,
    FactorizedLinear,
    FDSpec,
    SettingsError,
    StructureSpec,
    flat_settings,
    form_memberships,
    form_parameters,
    plan_ranks,
)
from ..core.settings import flag, specs_from_flat
from .attention import reduce_attention, register_fairseq_attention_forms
from .dense import (
    FactorizedPositionalEmbedding,
    add_dense_args,
    dense_defaults,
    dense_fill,
    drop_projection_biases,
    fresh_projection,
    paper_init,
)

FD_CRITERION = "fd_label_smoothed_cross_entropy"
# optimizers of this plugin: they read each parameter's decay from p.optim_overrides["fnl"]
FD_AWARE_OPTIMIZERS = ("fnl_adam", "flambe", "fnl_lamb")
DECOUPLED_FD_OPTIMIZERS = ("flambe",)  # apply decoupled FD
OVERRIDES_KEY = "fnl"


def add_fnl_args(parser) -> None:
    """One flag per core flat setting (meaning from the core's field help)."""
    g = parser.add_argument_group("fnl_transformers (factorized layers, SI, reduced heads, Frobenius decay)")
    for s in flat_settings():
        kw = dict(default=None, help=s.help + ("" if s.default in (None, {}) else f" (default: {_show(s.default)})"))
        if s.type == "bool":
            g.add_argument(flag(s.name), action=argparse.BooleanOptionalAction, **kw)
        elif s.choices:
            g.add_argument(flag(s.name), choices=s.choices, **kw)
        else:
            metavar = {"factorize": "PARTS", "ranks": "PATTERN=RANK,..."}.get(s.name, "D" if s.type == "int" else "X")
            g.add_argument(flag(s.name), type={"int": int, "float": float}.get(s.type, str), metavar=metavar, **kw)


def _show(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def fnl_defaults(args) -> None:
    """Every fnl option present in ``args`` (``None`` = not given: the core spec's default applies)."""
    for s in flat_settings():
        if not hasattr(args, s.name):
            setattr(args, s.name, None)


def fnl_specs(args) -> Tuple[StructureSpec, FDSpec, DecayPolicy]:
    """The core specs of the fnl options in ``args``: one clear error (naming the flag) per bad option."""
    values = {s.name: getattr(args, s.name, None) for s in flat_settings()}
    structure, fd, weight_decay_factors = specs_from_flat(values, namer=flag)
    # fairseq's stock optimizers decay every parameter: biases and norms too unless --no-decay-bias-norm
    policy = DecayPolicy(
        fd, weight_decay_factors=weight_decay_factors, decay_bias_norm=not getattr(args, "no_decay_bias_norm", False)
    )
    return structure, fd, policy


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


def _shrinks_heads(s: StructureSpec) -> bool:
    return (
        s.head_dim_qk is not None
        or s.head_dim_ov is not None
        or ("attention" in s.factorize and s.rank_scale is not None)
    )


def _check_model_options(args, s: StructureSpec) -> None:
    if s.activation_aware:
        raise ValueError(
            "--activation-aware truncates pretrained weights in the norm of their outputs on calibration "
            "data, and fnl_transformer models are trained from scratch: drop it (--spectral-init "
            "factorizes the initialization)"
        )
    if s.factorizes and "embedding" in s.factorize and getattr(args, "adaptive_softmax_cutoff", None):
        raise ValueError(
            "--adaptive-softmax-cutoff is not supported with factorized embeddings; "
            "use --factorize ffn or drop the adaptive softmax"
        )
    touches = _shrinks_heads(s) or s.spectral_init_qk or s.spectral_init_ov
    if (s.factorizes or touches) and (getattr(args, "quant_noise_pq", 0) or 0) > 0:
        raise ValueError("--quant-noise-pq is not supported with fnl options (it wraps the dense layers); set it to 0")
    if _shrinks_heads(s):
        for name in ("cross_self_attention", "scale_heads", "adaptive_input"):
            if getattr(args, name, False):
                raise ValueError(f"--{name.replace('_', '-')} is not supported with --head-dim; drop one of them")


def _layer_candidates(model: TransformerModel, s: StructureSpec) -> List[Tuple[str, nn.Module]]:
    """The dense layers of the parts in ``--factorize``, by qualified name (a shared embedding once)."""
    out: List[Tuple[str, nn.Module]] = []
    if "position" in s.factorize and s.factorizes:
        for side in ("encoder", "decoder"):
            pos = getattr(model, side).embed_positions
            if not isinstance(pos, LearnedPositionalEmbedding):
                raise ValueError(
                    f"--factorize position needs learned positional embeddings, but the {side}'s are "
                    f"{type(pos).__name__}: add --encoder-learned-pos --decoder-learned-pos (as "
                    "fnl_transformer_small) or drop 'position' from --factorize"
                )
            out.append((f"{side}.embed_positions", pos))
    if "ffn" in s.factorize:
        for side in ("encoder", "decoder"):
            for i, layer in enumerate(getattr(model, side).layers):
                out += [(f"{side}.layers.{i}.fc1", layer.fc1), (f"{side}.layers.{i}.fc2", layer.fc2)]
    if "embedding" in s.factorize:
        enc, dec = model.encoder.embed_tokens, model.decoder.embed_tokens
        out.append(("encoder.embed_tokens", enc))
        if dec is not enc:
            out.append(("decoder.embed_tokens", dec))
        if not model.decoder.share_input_output_embed:
            out.append(("decoder.output_projection", model.decoder.output_projection))
    return out


def _factorized(name: str, module: nn.Module, rank: int, s: StructureSpec, dense_init: str) -> nn.Module:
    init = s.layer_init
    fill = dense_fill(name, module, dense_init) if init == "dense" else None
    if isinstance(module, LearnedPositionalEmbedding):
        return FactorizedPositionalEmbedding.from_learned(module, rank, init, s.deep, fill)
    if isinstance(module, nn.Embedding):
        return FactorizedEmbedding.from_embedding(module, rank=rank, init=init, deep=s.deep, fill=fill)
    return FactorizedLinear.from_linear(module, rank=rank, init=init, deep=s.deep, fill=fill)


def apply_structure(model: TransformerModel, s: StructureSpec, dense_init: str = "fairseq") -> None:
    """Transform a freshly built dense ``transformer`` in place (see the module docstring): heads first, then the
    layers at the ranks :func:`~fnl_transformers.core.plan_ranks` gives (a parameter budget counts the heads).
    ``dense_init``: the model's initialization rule (``--dense-init``), for fresh heads and ``--factor-init
    dense``."""
    before = sum(p.numel() for p in model.parameters())
    removed = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, MultiheadAttention):
            removed += reduce_attention(module, s, name=name, fresh=fresh_projection(module, dense_init))
    shared = model.decoder.embed_tokens is model.encoder.embed_tokens
    candidates = _layer_candidates(model, s)
    ranks = plan_ranks([(name, *module.weight.shape) for name, module in candidates], s, before, before - removed)
    for name, module in candidates:
        if name not in ranks:
            continue
        layer = _factorized(name, module, ranks[name], s, dense_init)
        if name == "decoder.output_projection":
            layer.fd_kind = "embedding"  # the output embedding table (FD kind of this one layer)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        if name == "encoder.embed_tokens" and shared:
            model.decoder.embed_tokens = layer
    dec = model.decoder.embed_tokens
    if model.decoder.share_input_output_embed and isinstance(dec, FactorizedEmbedding):
        model.decoder.output_projection = TiedFactorizedProjection(dec)
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
        add_dense_args(parser)
        add_fnl_args(parser)

    @classmethod
    def build_model(cls, args, task):
        fnl_defaults(args)
        dense_defaults(args)  # checkpoints saved before these options: fairseq's dense model
        try:
            structure, fd, policy = fnl_specs(args)
            _check_model_options(args, structure)
            model = super().build_model(args, task)  # dense, the same random numbers as `transformer`
            if not args.projection_bias:
                drop_projection_biases(model)
            if args.dense_init == "paper":
                paper_init(model)
            apply_structure(model, structure, args.dense_init)
            fd.check_present(kind for _, _, kind in form_parameters(model))
        except SettingsError as e:
            raise e.spelled(flag) from None
        args.factorize = ",".join(structure.factorize)  # normalized, recorded in the checkpoint
        model.fnl_structure, model.fnl_fd, model.fnl_policy = structure, fd, policy
        model.fnl_num_updates = 0
        _check_training_setup(model, args)
        set_optim_overrides(model, policy)
        return model

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
            shapes = [
                f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                for k in own
                if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)
            ]
            if not (missing or unexpected or shapes):
                raise
            show = lambda xs: ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")  # noqa: E731
            parts = [
                f"{label}: {show(xs)}"
                for label, xs in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("checkpoint vs model shape", shapes),
                )
                if xs
            ]
            raise ValueError(
                "checkpoint does not match this fnl_transformer configuration (" + "; ".join(parts) + "); build the "
                "model with the options it was trained with (--rank-scale, --factorize, --deep, --head-dim*, "
                "--share-*), which are stored in the checkpoint's cfg['model']"
            ) from exc


def set_optim_overrides(model: nn.Module, policy: DecayPolicy) -> None:
    """Record each parameter's decay (``fd``, ``weight_decay`` or ``none``) in ``p.optim_overrides["fnl"]``, with
    ``"weight_decay": 0.0`` for the parameters without weight decay and, for decoupled FD, the coefficients and
    the parameter's form memberships (core :func:`~fnl_transformers.core.form_memberships`)."""
    fd = policy.fd
    memberships = form_memberships(model, fd.active) if fd.decoupled else {}
    coeffs = {k: v for k, v in fd.coefficients().items() if k in fd.active}
    for _, p, decay in policy.assign(model):
        overrides = dict(getattr(p, "optim_overrides", None) or {})
        entry: dict = {"decay": decay}
        if decay == FD and fd.decoupled:
            entry.update(fd=coeffs, forms=memberships[id(p)])
        overrides[OVERRIDES_KEY] = entry
        if decay != WEIGHT_DECAY:
            overrides["weight_decay"] = 0.0
        else:
            overrides.pop("weight_decay", None)
        p.optim_overrides = overrides


def _check_training_setup(model: FnlTransformerModel, args) -> None:
    """The criterion and optimizer must apply the FD spec and decay policy the model holds (skipped when the
    args name none, e.g. when a checkpoint is rebuilt for recomposing)."""
    fd, policy = model.fnl_fd, model.fnl_policy
    flags = ", ".join(
        f"--fd-{k}" for k in ("linear", "embedding", "qk", "ov") if getattr(fd, k) is not None and getattr(fd, k) > 0
    )
    criterion = getattr(args, "criterion", None)
    if fd.coupled and criterion is not None and criterion != FD_CRITERION:
        raise ValueError(
            f"{flags} with --fd-mode coupled adds Frobenius decay to the loss, which --criterion {criterion} does not "
            f"do: use --criterion {FD_CRITERION}, or --fd-mode decoupled with --optimizer flambe"
        )
    optimizer = getattr(args, "optimizer", None)
    if fd.decoupled and optimizer is not None and optimizer not in DECOUPLED_FD_OPTIMIZERS:
        raise ValueError(
            f"{flags} with --fd-mode decoupled applies Frobenius decay in the optimizer, which --optimizer "
            f"{optimizer} does not do: use --optimizer flambe, or --fd-mode coupled with --criterion {FD_CRITERION}"
        )
    wd = float(getattr(args, "weight_decay", 0.0) or 0.0)
    kept_out = [decay for _, p, decay in policy.assign(model) if p.requires_grad and decay != WEIGHT_DECAY]
    if optimizer is not None and optimizer not in FD_AWARE_OPTIMIZERS and wd > 0 and kept_out:
        why = (
            f"{flags} replaces weight decay on the factors it decays"
            if FD in kept_out
            else "--no-weight-decay-factors keeps the factors out of weight decay"
        )
        raise ValueError(
            f"{why}, but --optimizer {optimizer} applies --weight-decay {wd:g} to every parameter. Use --optimizer "
            "fnl_adam (fairseq's adam with the decay policy's groups), flambe or fnl_lamb, or set --weight-decay 0"
        )


def fnl_base_architecture(args):
    base_architecture(args)
    dense_defaults(args)
    fnl_defaults(args)


def fnl_transformer_small(args):
    """The paper's IWSLT-14 model (the official ``transformer_small``): 2 + 2 pre-norm layers with final layer
    norms, d = 256, FFN 1024 (ReLU), 4 heads of dim 64, learned positions (1022 per side, numbered from
    ``padding_idx + 1``), no embedding scaling, separate source / target embeddings and an untied output
    projection, no biases in the attention projections and FFN layers, dropout 0.2, activation dropout 0.1, no
    attention dropout, and the official initialization (``--dense-init paper``)."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 256)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 1024)
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", args.encoder_embed_dim)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", args.encoder_ffn_embed_dim)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    args.encoder_normalize_before = getattr(args, "encoder_normalize_before", True)
    args.decoder_normalize_before = getattr(args, "decoder_normalize_before", True)
    args.encoder_learned_pos = getattr(args, "encoder_learned_pos", True)
    args.decoder_learned_pos = getattr(args, "decoder_learned_pos", True)
    args.max_source_positions = getattr(args, "max_source_positions", 1022)  # 1024 table rows, as the official
    args.max_target_positions = getattr(args, "max_target_positions", 1022)
    args.no_scale_embedding = getattr(args, "no_scale_embedding", True)
    args.dropout = getattr(args, "dropout", 0.2)
    args.activation_dropout = getattr(args, "activation_dropout", 0.1)
    args.attention_dropout = getattr(args, "attention_dropout", 0.0)
    args.activation_fn = getattr(args, "activation_fn", "relu")
    args.share_decoder_input_output_embed = getattr(args, "share_decoder_input_output_embed", False)
    args.share_all_embeddings = getattr(args, "share_all_embeddings", False)
    base_architecture(args)
    dense_defaults(args, projection_bias=False, dense_init="paper")
    fnl_defaults(args)


def fnl_transformer_iwslt_de_en(args):
    transformer_iwslt_de_en(args)
    dense_defaults(args)
    fnl_defaults(args)


def fnl_transformer_wmt_en_de(args):
    transformer_wmt_en_de(args)
    dense_defaults(args)
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
    "fnl_transformer_small": fnl_transformer_small,
    "fnl_transformer_iwslt_de_en": fnl_transformer_iwslt_de_en,
    "fnl_transformer_wmt_en_de": fnl_transformer_wmt_en_de,
    "fnl_transformer_tiny": fnl_transformer_tiny,
}
