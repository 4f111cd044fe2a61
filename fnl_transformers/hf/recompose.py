"""``recompose``: a vanilla copy of a patched model, with the original architecture's parameter names and shapes.

Factor products ``U [M] V^T`` are multiplied out in float32 (paper Sec. 5: overcomplete factors trained, then
multiplied out: teacher-free distillation); reduced heads are zero-padded back to the original head dim by the
core (:func:`~fnl_transformers.core.pad_heads`; heads scored by ``1/sqrt(reduced head dim)``, the rule
``reduced_heads='fresh'``, get that scaling folded into the query; the outputs are unchanged).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..core import clear_attention_forms, pad_heads
from ..core.sharded import holds_dtensors
from .arch import ARCHS, set_submodule
from .persist import forget_plan, plan_of


def recompose(model: PreTrainedModel) -> PreTrainedModel:
    """A vanilla copy of a patched ``model``: factor products multiplied out in float32, shrunk heads zero-padded
    back to the original head dim (a score scaling other than the model's folded into the query, so outputs are
    unchanged). The copy has
    the original architecture's parameter names and shapes: plain ``from_pretrained`` loads its
    ``save_pretrained`` output with no missing or unexpected keys. ``model`` itself is not modified."""
    if holds_dtensors(model):
        raise ValueError(
            "recompose multiplies whole factors; the model's parameters are FSDP2 shards (DTensors): load its full "
            "state dict (torch.distributed.checkpoint) into an unsharded patched model and recompose that"
        )
    plan = plan_of(model)
    arch = ARCHS[plan.arch]
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, entry in plan.layers.items():
            layer = out.get_submodule(name)
            if entry.type == "tied_head":
                dense = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
                dense.bias = layer.bias  # the shared output bias parameter, if any
                set_submodule(out, name, dense)  # its weight is tied to the input embedding below
            elif entry.type == "embedding":
                dense = layer.to_embedding()
                dense.padding_idx = entry.orig_padding_idx
                set_submodule(out, name, dense)
            elif entry.type == "conv1d":
                dense = Conv1D(layer.out_features, layer.in_features).to(layer.U.dtype)
                dense.to(layer.U.device)
                dense.weight.copy_(layer.product().t())
                dense.bias.copy_(layer.bias)
                set_submodule(out, name, dense)
            else:
                set_submodule(out, name, layer.to_linear())
        for name, att_entry in plan.attention.items():
            att = out.get_submodule(name)
            dims = att_entry.dims
            fold = att_entry.score_factor  # the score scaling used over the model's own, folded into the query
            if dims.changed or fold != 1.0:
                t = {k: None if v is None else v.clone() for k, v in arch.read(att, dims).items()}
                arch.write(att, pad_heads(t, dims, fold=fold), dims.full)
                if fold != 1.0:
                    arch.scale_scores(att, 1.0 / fold)
            clear_attention_forms(att)
    out.__dict__.pop("_tied_weights_keys", None)
    if any(e.type == "tied_head" for e in plan.layers.values()):
        out.all_tied_weights_keys = out.get_expanded_tied_weights_keys(all_submodels=False)
        out.tie_weights()
    forget_plan(out)
    return out
