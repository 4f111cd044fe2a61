"""Multiply out a ``fnl_transformer`` checkpoint into a checkpoint of fairseq's stock ``transformer``.

Paper: Khodak et al., ICLR 2021, Sec. 5: overcomplete ("deep") factors trained with FD are multiplied out after
training, giving a compact dense model without a teacher (teacher-free distillation); the same recomposition
deploys low-rank and reduced-head models with stock fairseq.

What changes, module by module (the function computed is unchanged):

* ``FactorizedLinear`` / ``FactorizedEmbedding`` (FFN ``fc1``/``fc2``, token embeddings, learned positional
  embeddings, untied output projection): the dense weight ``U M V^T``
  (:meth:`~fnl_transformers.core.FactorizedLinear.product`, float32) under fairseq's name ``<module>.weight``;
  biases are kept. A tied output projection (logits ``x E^T`` of the
  factorized decoder embedding) becomes fairseq's ``decoder.output_projection.weight = E``.
* Attention with reduced heads (q/k of per-head dim ``r_qk``, v/out of ``r_ov``): every head's rows of
  ``q_proj``/``k_proj``/``v_proj`` (and biases) and columns of ``out_proj`` are zero-padded to fairseq's head
  dim ``D = embed_dim / heads``; zero rows add nothing to ``q . k`` or to the output. fairseq scales scores by
  ``s_stock = 1/sqrt(D)``; the fnl module by its own ``scaling`` ``s_used``, so ``q_proj``'s weight and bias
  are multiplied by ``s_used / s_stock`` (1 by default, which keeps the original scaling; ``sqrt(D / r_qk)``
  under ``--reduced-heads fresh``).
* Projections without biases (``--no-projection-bias``, e.g. ``fnl_transformer_small``): zero biases in the stock
  model, whose layers always have them.
* Everything else (layer norms, biases, dense positional embeddings, buffers) is copied, in float32; the model
  args keep fairseq's own options (pre-norm, learned positions, no embedding scaling, separate embeddings), so
  the stock model has the same layout.

The result is checked before it is written: the stock model built from it and the fnl model give the same
decoder outputs on a random batch (max abs difference reported, error above ``1e-4`` relative).

The checkpoint written has ``cfg["model"]`` as a plain dict (arch ``transformer``, the fnl options removed),
the stock ``label_smoothed_cross_entropy`` criterion and no optimizer state, so it contains no pickled class
at all: stock ``fairseq-generate`` / ``-interactive`` / hub loading read it under torch >= 2.6 without
``--user-dir``. It is written atomically (temporary file in the output folder, then rename).
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..checkpoints import check_fairseq_checkpoint, check_output
from ..core import FactorizedEmbedding, FactorizedLinear, HeadDims, check_shrink, pad_heads

STOCK_ARCH = "transformer"
STOCK_CRITERION = "label_smoothed_cross_entropy"
VERIFY_RTOL = 1e-4


# ---------------------------------------------------------------- tensors (the math is the core's)


def dense_attention(
    p: Dict[str, Optional[torch.Tensor]], num_heads: int, embed_dim: int, scaling: float
) -> Dict[str, Optional[torch.Tensor]]:
    """Stock-fairseq attention tensors from reduced-head ones (``nn.Linear`` layout, keys ``q_weight``,
    ``q_bias``, ``k_*``, ``v_*``, ``o_weight``, ``o_bias``; per-head dims read from the shapes): heads zero-padded
    to ``D = embed_dim / heads`` and the score scaling ``scaling`` folded into the query (core
    :func:`~fnl_transformers.core.pad_heads`; paper Sec. 2.3, Eq. (1): the QK form ``s W_q,h W_k,h^T``)."""
    D = embed_dim // num_heads
    qk, ov = p["q_weight"].shape[0] // num_heads, p["v_weight"].shape[0] // num_heads
    for label, value in (("QK", qk), ("OV", ov)):
        check_shrink(f"per-head {label} dim", value, D, "fairseq's transformer (stock head dim)")
    return pad_heads(p, HeadDims(num_heads, num_heads, D, qk, ov), fold=scaling / D**-0.5)  # s_used / s_stock


def _dense_linear(module: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(module, FactorizedLinear):
        return module.product(), None if module.bias is None else module.bias.detach().float()
    if isinstance(module, nn.Linear):
        return module.weight.detach().float(), None if module.bias is None else module.bias.detach().float()
    raise ValueError(f"cannot multiply out a {type(module).__name__} attention projection")


def dense_state_dict(model: nn.Module, stock: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The float32 state dict of the stock ``transformer`` computing the same function as ``model`` (an
    ``fnl_transformer``); ``stock`` is the stock model's state dict (its keys must all be produced, no others;
    a projection bias the fnl model does not have, ``--no-projection-bias``, is written as zeros)."""
    stock_keys = list(stock)
    from fairseq.modules.multihead_attention import MultiheadAttention

    sd = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}
    for name, module in model.named_modules(remove_duplicate=False):  # shared embeddings: every name
        prefix = name + "." if name else ""
        if isinstance(module, (FactorizedLinear, FactorizedEmbedding)):
            for factor in ("U", "V", "M"):
                sd.pop(prefix + factor, None)
            sd[prefix + "weight"] = module.product()  # U M V^T, float32 (paper Sec. 2, Sec. 5)
        elif isinstance(module, MultiheadAttention):
            p = {}
            for key, proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
                p[f"{key}_weight"], p[f"{key}_bias"] = _dense_linear(getattr(module, proj))
                for factor in ("U", "V", "M"):
                    sd.pop(f"{prefix}{proj}.{factor}", None)
            dense = dense_attention(p, module.num_heads, module.embed_dim, float(module.scaling))
            for key, proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
                sd[f"{prefix}{proj}.weight"] = dense[f"{key}_weight"]
                if dense[f"{key}_bias"] is not None:
                    sd[f"{prefix}{proj}.bias"] = dense[f"{key}_bias"]
    if "decoder.output_projection.weight" in stock_keys and "decoder.output_projection.weight" not in sd:
        sd["decoder.output_projection.weight"] = sd["decoder.embed_tokens.weight"]  # tied projection x E^T
    for key in stock_keys:  # --no-projection-bias: the stock layers' biases are zero
        if key not in sd and key.endswith(".bias") and key[: -len("bias")] + "weight" in sd:
            sd[key] = torch.zeros_like(stock[key], dtype=torch.float32)
    missing = sorted(set(stock_keys) - set(sd))
    extra = sorted(set(sd) - set(stock_keys))
    if missing or extra:
        raise ValueError(
            f"cannot map this model onto fairseq's transformer: missing {missing[:5]}, unrecognized {extra[:5]}"
        )
    return {k: sd[k] for k in stock_keys}


# ---------------------------------------------------------------- checkpoints


class _Task:
    """What ``TransformerModel.build_model`` reads from a task: the dictionaries (sizes from the checkpoint)."""

    def __init__(self, source_dictionary, target_dictionary):
        self.source_dictionary = source_dictionary
        self.target_dictionary = target_dictionary


def _dictionary(size: int):
    from fairseq.data import Dictionary

    d = Dictionary()  # <s>=0 <pad>=1 </s>=2 <unk>=3, as every fairseq-preprocess dictionary
    for i in range(size - len(d)):
        d.add_symbol(f"<fnl_recompose_{i}>")
    return d


def _vocab_size(model_sd: Dict[str, Any], prefix: str) -> int:
    for suffix in ("weight", "U"):
        t = model_sd.get(f"{prefix}.embed_tokens.{suffix}")
        if t is not None:
            return int(t.shape[0])
    raise ValueError(f"the checkpoint has no {prefix}.embed_tokens weights: not a translation transformer")


def _fnl_option_names():
    from .dense import MODEL_OPTIONS
    from .model import add_fnl_args

    p = argparse.ArgumentParser()
    add_fnl_args(p)
    return {a.dest for a in p._actions if a.dest != "help"} | set(MODEL_OPTIONS)


def _as_namespace(model_cfg) -> argparse.Namespace:
    if isinstance(model_cfg, argparse.Namespace):
        return copy.deepcopy(model_cfg)
    if isinstance(model_cfg, dict):
        return argparse.Namespace(**copy.deepcopy(model_cfg))
    raise ValueError("the checkpoint has no model configuration (cfg['model'])")


def load_fnl_checkpoint(path: str) -> Dict[str, Any]:
    """Read ``path`` with the safe loader; clear ValueError / FileNotFoundError for anything unusable."""
    from . import safe_loading

    check_fairseq_checkpoint(path)  # exists, is a PyTorch file, holds 'model' and 'cfg' (read without loading)
    safe_loading.install()
    try:
        state = safe_loading.safe_load(path, map_location="cpu")
    except safe_loading.UnsafeCheckpointError as exc:
        raise ValueError(str(exc)) from exc
    except Exception as exc:  # not a torch file at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a fairseq checkpoint (torch.load: {first})") from exc
    if not isinstance(state, dict) or "model" not in state or not ("cfg" in state or "args" in state):
        raise ValueError(f"{path} is not a fairseq checkpoint (no 'model' and 'cfg' entries)")
    return state


def _model_cfg(state):
    cfg = state.get("cfg")
    if isinstance(cfg, dict) and cfg.get("model") is not None:
        return cfg["model"]
    return state.get("args")


def build_models(state: Dict[str, Any], path: str = "checkpoint"):
    """``(fnl_model, stock_model, stock_args)``: the fnl model loaded from ``state`` and an empty stock
    ``transformer`` of the same dimensions (float32, eval mode)."""
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY
    from fairseq.models.transformer import TransformerModel

    from . import FnlTransformerModel  # registers the plugin

    args = _as_namespace(_model_cfg(state))
    arch = getattr(args, "arch", None) or getattr(args, "_name", None)
    model_cls = ARCH_MODEL_REGISTRY.get(arch)
    if model_cls is None or not issubclass(model_cls, FnlTransformerModel):
        what = "a stock fairseq model already" if model_cls is not None else "not a registered architecture"
        raise ValueError(
            f"{path} is a {arch!r} checkpoint ({what}), not an fnl_transformer one: recompose only "
            "multiplies out checkpoints trained with --arch fnl_transformer*"
        )
    model_sd = state["model"]
    src = _dictionary(_vocab_size(model_sd, "encoder"))
    tgt = src if getattr(args, "share_all_embeddings", False) else _dictionary(_vocab_size(model_sd, "decoder"))
    task = _Task(src, tgt)

    fnl_args = copy.deepcopy(args)
    # shapes do not depend on the initialization or the training setup: skip SI work, embedding files and the
    # optimizer/criterion checks; the weights come from the checkpoint
    fnl_args.spectral_init = False  # no SVDs; shrunk heads get fresh projections of the same shapes
    for flag in ("spectral_init_qk", "spectral_init_ov"):
        if getattr(fnl_args, flag, None):
            setattr(fnl_args, flag, None)  # a re-balance at full dim changes no shape
    fnl_args.encoder_embed_path = fnl_args.decoder_embed_path = None
    fnl_args.criterion, fnl_args.optimizer = None, None
    ARCH_CONFIG_REGISTRY[arch](fnl_args)
    fnl = model_cls.build_model(fnl_args, task)
    fnl.load_state_dict(model_sd, strict=True, model_cfg=None)
    fnl = fnl.float().eval()

    stock_args = copy.deepcopy(args)
    for name in _fnl_option_names():
        if hasattr(stock_args, name):
            delattr(stock_args, name)
    stock_args.arch = stock_args._name = STOCK_ARCH
    stock_args.encoder_embed_path = stock_args.decoder_embed_path = None
    stock_args.user_dir = None
    ARCH_CONFIG_REGISTRY[STOCK_ARCH](stock_args)
    stock = TransformerModel.build_model(stock_args, task).float().eval()
    return fnl, stock, stock_args


def _compare(fnl: nn.Module, stock: nn.Module, vocab: Tuple[int, int], seed: int = 0) -> float:
    """Max abs difference of the decoder outputs (logits) on a random batch, relative to their scale."""
    g = torch.Generator().manual_seed(seed)
    bsz, src_len, tgt_len = 3, 7, 6
    src = torch.randint(4, vocab[0], (bsz, src_len), generator=g)
    src[0, :2] = 1  # left padding in one sentence, as fairseq batches it
    lengths = (src != 1).sum(1)
    prev = torch.randint(4, vocab[1], (bsz, tgt_len), generator=g)
    prev[:, 0] = 2
    with torch.no_grad():
        a = fnl(src, lengths, prev)[0]
        b = stock(src, lengths, prev)[0]
    return float((a - b).abs().max() / a.abs().max().clamp_min(1.0))


def _stock_cfg(cfg: Optional[dict], stock_args: argparse.Namespace) -> dict:
    from .optim import OPTIMIZERS

    cfg = copy.deepcopy(cfg) if isinstance(cfg, dict) else {}
    # the model args of a legacy model are the whole command line: drop the plugin criterion's options too
    model = {k: v for k, v in vars(stock_args).items() if not k.startswith("fd_") and k != "form_diagnostics_interval"}
    for key in ("criterion", "optimizer"):  # names the plugin registered are unknown to stock fairseq
        if model.get(key) in ("fd_label_smoothed_cross_entropy", *OPTIMIZERS):
            model[key] = STOCK_CRITERION if key == "criterion" else None
    cfg["model"] = model
    if isinstance(cfg.get("common"), dict):
        cfg["common"]["user_dir"] = None
    crit = cfg.get("criterion")
    if isinstance(crit, dict) and crit.get("_name") == "fd_label_smoothed_cross_entropy":
        cfg["criterion"] = {
            k: v for k, v in crit.items() if not k.startswith("fd_") and k != "form_diagnostics_interval"
        }
        cfg["criterion"]["_name"] = STOCK_CRITERION
    opt = cfg.get("optimizer")
    if isinstance(opt, dict) and opt.get("_name") in OPTIMIZERS:
        cfg["optimizer"] = None
    return cfg


def recompose_state(state: Dict[str, Any], path: str = "checkpoint") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(stock_state, info)``: the stock-``transformer`` checkpoint dict for an fnl checkpoint dict."""
    fnl, stock, stock_args = build_models(state, path)
    stock.load_state_dict(dense_state_dict(fnl, stock.state_dict()), strict=True)
    vocab = (len(stock.encoder.dictionary), len(stock.decoder.dictionary))
    diff = _compare(fnl, stock, vocab)
    if not diff <= VERIFY_RTOL:
        raise RuntimeError(
            f"recomposed model differs from the fnl model by {diff:.3g} (relative) on a random batch; "
            "this is a bug in fnl recompose, please report it"
        )
    history = state.get("optimizer_history") or [{}]
    last = history[-1]
    extra = state.get("extra_state") or {}
    out = {
        "args": None,
        "cfg": _stock_cfg(state.get("cfg"), stock_args),
        "model": stock.state_dict(),
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "LabelSmoothedCrossEntropyCriterion",
                "optimizer_name": "none (recomposed by fnl_transformers)",
                "lr_scheduler_state": {"best": None},
                "num_updates": int(last.get("num_updates", 0)),
            }
        ],
        "task_state": state.get("task_state") or {},
        "extra_state": {
            k: extra[k]
            for k in ("train_iterator", "epoch", "val_loss", "best", "previous_training_time")
            if k in extra and isinstance(extra[k], (dict, int, float, type(None)))
        },
    }
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    info = {
        "max_rel_diff": diff,
        "fnl_params": count(fnl),
        "stock_params": count(stock),
        "num_updates": out["optimizer_history"][0]["num_updates"],
    }
    return out, info


def write_atomically(obj: Any, out_path: str, overwrite: bool = False) -> None:
    """``torch.save`` to a temporary file beside ``out_path``, then rename: ``out_path`` is complete or absent."""
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder} does not exist; create it first")
    if os.path.exists(out_path) and not overwrite:
        raise ValueError(f"{out_path} already exists (possibly from an earlier run); remove it or pass --force")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out_path)}.", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def recompose_checkpoint(src: str, dst: str, overwrite: bool = False) -> Dict[str, Any]:
    """Read the fnl checkpoint ``src``, write the stock ``transformer`` checkpoint ``dst``; returns info."""
    check_output(src, dst, overwrite)  # fail before the work
    out, info = recompose_state(load_fnl_checkpoint(src), src)
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(buf)
    if unsafe:  # stock fairseq could not load it under torch >= 2.6 without the plugin
        raise RuntimeError(f"recomposed checkpoint would need {unsafe}; this is a bug in fnl recompose")
    write_atomically(out, dst, overwrite=overwrite)
    return info
