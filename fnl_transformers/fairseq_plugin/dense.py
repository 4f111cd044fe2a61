"""The dense model under the factorization: projection biases, the dense initialization, learned positions.

Options of the fairseq model (not core settings: they describe the dense ``transformer`` being factorized, and
recompose maps them back onto a stock ``transformer``):

* ``--projection-bias / --no-projection-bias``: biases of the attention projections (``q/k/v/out_proj``) and of
  the FFN layers (``fc1``/``fc2``). fairseq's ``transformer`` always has them; the paper's official
  ``transformer_small`` has none (``fnl_transformer_small``'s default). Without them the modules hold no
  ``bias`` parameter at all (recompose writes zero biases for the stock model).
* ``--dense-init {fairseq,paper}``: the dense model's initialization. ``fairseq`` keeps fairseq's own;
  ``paper`` is the official ``transformer_small``'s: every linear weight (and bias) ``U(-0.1, 0.1)``, every
  embedding table (tokens and learned positions) ``N(0, 0.1^2)``, padding rows zero. It is also "the model's
  initialization" of the core rules that need one: factors without SI under ``--factor-init dense``
  (:func:`dense_fill`) and fresh reduced heads (:func:`fresh_projection`).

:class:`FactorizedPositionalEmbedding` is fairseq's ``LearnedPositionalEmbedding`` (positions numbered from
``padding_idx + 1``, the incremental-decoding step position) on a factorized table ``U [M] V^T`` (the part
``position`` of ``--factorize``).
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Dict, Optional

import torch
from fairseq import utils
from fairseq.modules import LearnedPositionalEmbedding
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor, nn

from ..core import FactorizedEmbedding

DENSE_INITS = ("fairseq", "paper")
PAPER_LINEAR_BOUND = 0.1  # U(-0.1, 0.1): the official transformer_small's Linear weights and biases
PAPER_EMBEDDING_STD = 0.1  # N(0, 0.1^2): its token and positional embeddings
MODEL_OPTIONS = ("projection_bias", "dense_init")  # the args these options set (removed for a stock model)

Fill = Callable[[Tensor], Tensor]


def add_dense_args(parser) -> None:
    g = parser.add_argument_group("fnl_transformers (the dense model under the factorization)")
    g.add_argument(
        "--projection-bias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="biases in the attention projections and FFN layers (fairseq's transformer has them; the "
        "paper's official transformer_small, fnl_transformer_small's default, has none)",
    )
    g.add_argument(
        "--dense-init",
        choices=DENSE_INITS,
        default=None,
        help="initialization of the dense model: fairseq (its own) or paper (linear weights U(-0.1, "
        "0.1), embeddings N(0, 0.1^2): the official transformer_small, fnl_transformer_small's "
        "default); also the rule of --factor-init dense and of fresh reduced heads",
    )


def dense_defaults(args, projection_bias: bool = True, dense_init: str = "fairseq") -> None:
    """The architecture's defaults for the options not given."""
    if getattr(args, "projection_bias", None) is None:
        args.projection_bias = projection_bias
    if getattr(args, "dense_init", None) is None:
        args.dense_init = dense_init


def _projections(model: nn.Module):
    """``(name, nn.Linear)`` of every attention projection and FFN layer."""
    for name, module in model.named_modules():
        if isinstance(module, MultiheadAttention):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                yield f"{name}.{proj}", getattr(module, proj)
        elif name.rpartition(".")[2] in ("fc1", "fc2") and isinstance(module, nn.Linear):
            yield name, module


def drop_projection_biases(model: nn.Module) -> None:
    """Remove the bias parameters of every attention projection and FFN layer (``nn.Linear`` with ``bias=None``
    computes ``x W^T``). Attention then never takes fairseq's fused path (which concatenates the biases)."""
    for _, linear in _projections(model):
        linear.register_parameter("bias", None)
    for module in model.modules():
        if isinstance(module, MultiheadAttention):
            module.skip_embed_dim_check = True  # fairseq's own switch to its unfused attention path


def paper_init(model: nn.Module) -> None:
    """The official ``transformer_small``'s initialization: linear weights and biases ``U(-0.1, 0.1)``,
    embeddings ``N(0, 0.1^2)`` with zero padding rows (fairseq's convention: a padding row gets no gradient)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.uniform_(module.weight, -PAPER_LINEAR_BOUND, PAPER_LINEAR_BOUND)
                if module.bias is not None:
                    nn.init.uniform_(module.bias, -PAPER_LINEAR_BOUND, PAPER_LINEAR_BOUND)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, PAPER_EMBEDDING_STD)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()


def _uniform(bound: float) -> Fill:
    return lambda t: nn.init.uniform_(t, -bound, bound)


def _normal(std: float) -> Fill:
    return lambda t: nn.init.normal_(t, 0.0, std)


def dense_fill(name: str, module: nn.Module, rule: str) -> Fill:
    """The dense initialization of layer ``name`` (an FFN layer, an embedding table or the output projection)
    under ``--dense-init rule``: the distribution ``--factor-init dense`` draws each factor from."""
    if rule == "paper":
        return _normal(PAPER_EMBEDDING_STD) if isinstance(module, nn.Embedding) else _uniform(PAPER_LINEAR_BOUND)
    if isinstance(module, nn.Embedding) or name == "decoder.output_projection":
        return _normal(module.weight.shape[1] ** -0.5)  # fairseq: embeddings and output projection N(0, 1/d)
    return _uniform(1 / math.sqrt(module.weight.shape[1]))  # nn.Linear's default (fairseq's fc1 / fc2)


def fresh_projection(attn: MultiheadAttention, rule: str):
    """A new projection's tensors of ``attn`` at a reduced size (core ``shrink_heads``' ``fresh``): fairseq's
    ``MultiheadAttention.reset_parameters`` (xavier-uniform weights, gain ``1/sqrt(2)`` for q/k/v when they
    share a dim; q/k/v biases as ``nn.Linear`` draws them; zero output bias), or under ``paper``
    ``U(-0.1, 0.1)`` for every weight and bias."""
    if rule == "paper":

        def paper(key: str, shape, like: Tensor) -> Tensor:
            return torch.empty(shape, dtype=like.dtype, device=like.device).uniform_(
                -PAPER_LINEAR_BOUND, PAPER_LINEAR_BOUND
            )

        return paper
    gain = 1 / math.sqrt(2) if attn.qkv_same_dim else 1.0
    fan_in = {"q": attn.embed_dim, "k": attn.kdim, "v": attn.vdim}

    def fresh(key: str, shape, like: Tensor) -> Tensor:
        out = torch.empty(shape, dtype=like.dtype, device=like.device)
        if key.endswith("weight"):
            return nn.init.xavier_uniform_(out, gain=1.0 if key == "o_weight" else gain)
        if key == "o_bias":
            return out.zero_()
        bound = 1 / math.sqrt(fan_in[key[0]])
        return out.uniform_(-bound, bound)

    return fresh


class FactorizedPositionalEmbedding(FactorizedEmbedding):
    """fairseq's ``LearnedPositionalEmbedding`` with a factorized table: positions of non-padding tokens are
    numbered from ``padding_idx + 1`` (``utils.make_positions``); one decoding step has position
    ``padding_idx + input length``. Made by :meth:`from_learned`."""

    onnx_trace = False

    def forward(
        self,
        input: Tensor,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        positions: Optional[Tensor] = None,
    ) -> Tensor:
        if positions is None:
            if incremental_state is not None:
                positions = torch.full(
                    (1, 1), int(self.padding_idx + input.size(1)), device=input.device, dtype=torch.long
                )
            else:
                positions = utils.make_positions(input, self.padding_idx, onnx_trace=self.onnx_trace)
        return super().forward(positions)

    @property
    def max_positions(self) -> int:
        return self.num_embeddings - self.padding_idx - 1

    @classmethod
    def from_learned(
        cls, embedding: LearnedPositionalEmbedding, rank: int, init: str, deep: bool, fill: Optional[Fill] = None
    ) -> "FactorizedPositionalEmbedding":
        if embedding.padding_idx is None:
            raise ValueError("factorized learned positions need fairseq's padding offset (padding_idx set)")
        layer = FactorizedEmbedding.from_embedding(embedding, rank=rank, init=init, deep=deep, fill=fill)
        layer.__class__ = cls
        return layer


__all__ = [
    "DENSE_INITS",
    "FactorizedPositionalEmbedding",
    "MODEL_OPTIONS",
    "add_dense_args",
    "dense_defaults",
    "dense_fill",
    "drop_projection_biases",
    "fresh_projection",
    "paper_init",
]
