"""Projection layers the HF patchers put into attention and LM heads (shape adapters, no new math).

When the QK and OV per-head dimensions differ (or only one of them shrinks, as in Llama where RoPE forbids
shrinking QK), an attention forward that reshapes queries, keys and values with one ``head_dim`` attribute
needs them all at one width ``outer``. These layers keep the *parameters* at the reduced width ``inner``
and zero-pad (or slice) per head in the forward, which leaves every score and output exactly as with the
reduced heads: zero query/key dimensions add nothing to ``q . k``, zero value dimensions are dropped again
before the output projection. Their state-dict keys and shapes are those of a plain reduced layer.

:class:`TiedFactorizedHead` is the output projection tied to a :class:`~fnl_transformers.core.FactorizedEmbedding`
(logits ``x E^T`` through :meth:`FactorizedEmbedding.project`, never forming ``E``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core import FactorizedEmbedding


def pad_activations(y: torch.Tensor, heads: int, inner: int, outer: int) -> torch.Tensor:
    """``(..., heads * inner) -> (..., heads * outer)``: zero-pad each head's activations (a forward-time shape
    adapter; padding weights back is core :func:`~fnl_transformers.core.pad_heads`)."""
    if inner == outer:
        return y
    return F.pad(y.unflatten(-1, (heads, inner)), (0, outer - inner)).flatten(-2)


def slice_activations(x: torch.Tensor, heads: int, inner: int, outer: int) -> torch.Tensor:
    """``(..., heads * outer) -> (..., heads * inner)``: keep each head's first ``inner`` dimensions."""
    if inner == outer:
        return x
    return x.unflatten(-1, (heads, outer))[..., :inner].flatten(-2)


class HeadPaddedLinear(nn.Linear):
    """``nn.Linear(in, heads * inner)`` whose output is zero-padded per head to ``heads * outer``."""

    def __init__(
        self, in_features: int, heads: int, inner: int, outer: int, bias: bool = True, dtype=None, device=None
    ):
        super().__init__(in_features, heads * inner, bias=bias, dtype=dtype, device=device)
        self.heads, self.inner, self.outer = heads, inner, outer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pad_activations(super().forward(x), self.heads, self.inner, self.outer)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", heads={self.heads}, padded_head_dim={self.outer}"


class HeadSlicedLinear(nn.Linear):
    """``nn.Linear(heads * inner, out)`` fed with ``heads * outer`` inputs of which each head's first ``inner``
    are used (the rest are the zero padding of :class:`HeadPaddedLinear` values)."""

    def __init__(
        self, heads: int, inner: int, outer: int, out_features: int, bias: bool = True, dtype=None, device=None
    ):
        super().__init__(heads * inner, out_features, bias=bias, dtype=dtype, device=device)
        self.heads, self.inner, self.outer = heads, inner, outer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(slice_activations(x, self.heads, self.inner, self.outer))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", heads={self.heads}, padded_head_dim={self.outer}"


class HeadPaddedConv1D(Conv1D):
    """GPT-2's fused ``c_attn`` (``Conv1D``, weight ``d x sum(heads * inner_i)``) whose q, k, v sections of
    per-head widths ``inners`` are each zero-padded per head to ``outer``."""

    def __init__(self, nx: int, heads: int, inners: Sequence[int], outer: int):
        super().__init__(heads * sum(inners), nx)
        self.heads, self.inners, self.outer = heads, tuple(inners), outer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = super().forward(x).split([self.heads * i for i in self.inners], dim=-1)
        return torch.cat([pad_activations(p, self.heads, i, self.outer) for p, i in zip(parts, self.inners)], dim=-1)

    def __repr__(self) -> str:
        return (
            f"HeadPaddedConv1D(nf={self.nf}, nx={self.nx}, heads={self.heads}, inners={self.inners}, "
            f"outer={self.outer})"
        )


class HeadSlicedConv1D(Conv1D):
    """GPT-2's ``c_proj`` (``Conv1D``, weight ``heads * inner x d``) fed with per-head padded inputs."""

    def __init__(self, heads: int, inner: int, outer: int, nf: int):
        super().__init__(nf, heads * inner)
        self.heads, self.inner, self.outer = heads, inner, outer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(slice_activations(x, self.heads, self.inner, self.outer))

    def __repr__(self) -> str:
        return (
            f"HeadSlicedConv1D(nf={self.nf}, nx={self.nx}, heads={self.heads}, inner={self.inner}, outer={self.outer})"
        )


class TiedFactorizedHead(nn.Module):
    """Output embedding tied to a ``FactorizedEmbedding``: ``logits = x E^T (+ bias)`` with ``E = U [M] V^T``.

    The embedding is referenced, not registered as a child, so its factors appear once in ``state_dict`` (under
    the embedding) and are shared exactly: the head has no parameter but its optional ``bias``.
    """

    def __init__(self, embedding: FactorizedEmbedding, bias: Optional[nn.Parameter] = None):
        super().__init__()
        if not isinstance(embedding, FactorizedEmbedding):
            raise TypeError(f"TiedFactorizedHead needs a FactorizedEmbedding, got {type(embedding).__name__}")
        object.__setattr__(self, "embedding", embedding)  # a reference, not a submodule
        self.bias = bias
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.embedding.project(x)  # x E^T = ((x V) M^T) U^T
        return logits if self.bias is None else logits + self.bias

    @property
    def weight(self) -> torch.Tensor:
        """The tied dense table ``E`` (differentiable), for code that reads ``output_embeddings.weight``."""
        return self.embedding.weight

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            "tied to a FactorizedEmbedding"
        )
