"""Factorized layers ``W = U [M] V^T`` with spectral or random initialization.

Paper: Khodak et al., ICLR 2021, Sec. 2 (factorized layers, rank scale), Definition 3.1 (SI), Sec. 5 (overcomplete
"deep" factors ``U M V^T`` multiplied out after training: teacher-free distillation).

Every layer type implements the same small trio: ``from_*`` (factorize a dense layer), ``product()`` (the
dense weight, float32) and ``to_*`` (back to the plain dense layer). Initializations are named functions
chosen by a string (:data:`INIT_METHODS`): ``spectral`` (SI), ``random`` (each factor as its own ``nn.Linear``)
and ``dense`` (each factor drawn from the dense layer's own initialization, given as ``fill``; without one,
PyTorch's default for the layer type: ``U(-1/sqrt(in), 1/sqrt(in))`` for ``nn.Linear``, ``N(0, 1)`` for
``nn.Embedding``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .forms import FactorView, FormSpec
from .frobenius import use_product
from .rank import check_matrix, check_positive_int, resolve_rank
from .spectral import spectral_init


def init_spectral(weight: torch.Tensor, rank: int, generator=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """SI (paper Definition 3.1): ``U = U_r sqrt(S_r)``, ``V = V_r sqrt(S_r)`` of the dense weight."""
    return spectral_init(weight, rank, generator=generator)


def init_random(weight: torch.Tensor, rank: int, generator=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each factor initialized as its own ``nn.Linear`` would be (Kaiming-uniform, ``a = sqrt(5)``): ``V^T``
    as a layer ``n -> r`` (bound ``1/sqrt(n)``), ``U`` as a layer ``r -> m`` (bound ``1/sqrt(r)``). The
    paper's "regular" initialization of factorized layers, the baseline SI improves on."""
    m, n = weight.shape
    # drawn on the generator's device (a CPU generator also seeds CUDA factors), then moved to the weight's
    kw: Dict[str, Any] = dict(dtype=weight.dtype, device=generator.device if generator is not None else weight.device)
    U = (torch.rand(m, rank, generator=generator, **kw) * 2 - 1) / math.sqrt(rank)
    V = (torch.rand(n, rank, generator=generator, **kw) * 2 - 1) / math.sqrt(n)
    return U.to(weight.device), V.to(weight.device)


# fill(tensor) -> tensor: draws every entry of ``tensor`` in place from a layer's initialization distribution
Fill = Callable[[torch.Tensor], torch.Tensor]


def linear_default_fill(in_features: int) -> Fill:
    """``nn.Linear``'s default weights (Kaiming-uniform, ``a = sqrt(5)``): ``U(-1/sqrt(in), 1/sqrt(in))``."""
    bound = 1 / math.sqrt(in_features)
    return lambda t: nn.init.uniform_(t, -bound, bound)


def embedding_default_fill(t: torch.Tensor) -> torch.Tensor:
    """``nn.Embedding``'s default weight distribution, ``N(0, 1)``."""
    return nn.init.normal_(t)


def init_dense(
    weight: torch.Tensor, rank: int, generator=None, fill: Optional[Fill] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each factor's entries drawn from the dense layer's own initialization ``fill`` (the rule of the paper's
    official code, e.g. ``U(-0.1, 0.1)`` for both factors of its linear layers): ``U (m x r)``, ``V (n x r)``.
    ``fill`` defaults to ``nn.Linear``'s distribution for a weight of this shape."""
    m, n = weight.shape
    fill = linear_default_fill(n) if fill is None else fill
    U = torch.empty(m, rank, dtype=weight.dtype, device=weight.device)
    V = torch.empty(n, rank, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        fill(U)
        fill(V)
    return U, V


INIT_METHODS: Dict[str, Callable] = {"spectral": init_spectral, "random": init_random, "dense": init_dense}


def _init(weight: torch.Tensor, rank: int, init, generator=None, fill: Optional[Fill] = None):
    """``init``: a name in :data:`INIT_METHODS`, or a callable ``(weight, rank, generator=None) -> (U, V)`` (e.g.
    factors computed beforehand by :func:`fnl_transformers.core.activation.activation_init`); ``fill``: the dense
    layer's initialization, for ``init='dense'``."""
    if callable(init):
        U, V = init(weight, rank, generator=generator)
        m, n = weight.shape
        if tuple(U.shape) != (m, rank) or tuple(V.shape) != (n, rank):
            raise ValueError(
                f"init returned factors of shapes {tuple(U.shape)} and {tuple(V.shape)}; a rank-{rank} "
                f"factorization of a {m} x {n} weight needs ({m}, {rank}) and ({n}, {rank})"
            )
        return U, V
    if init not in INIT_METHODS:
        raise ValueError(
            f"init must be one of {sorted(INIT_METHODS)} or a callable (weight, rank, generator) -> "
            f"(U, V), got {init!r}"
        )
    if init == "dense":
        return init_dense(weight, rank, generator=generator, fill=fill)
    if fill is not None:
        raise ValueError(f"fill (the dense layer's initialization) applies to init='dense', not {init!r}")
    return INIT_METHODS[init](weight, rank, generator=generator)


class _Factorized(nn.Module):
    """Shared parameters and form declaration of ``U (m x r) [M (r x r)] V^T (r x n)``."""

    fd_kind = "linear"

    def _make_factors(self, m: int, n: int, rank: int, deep: bool, dtype=None, device=None):
        self.rank = check_positive_int("rank", rank)
        self.deep = bool(deep)
        kw = dict(dtype=dtype, device=device)
        self.U = nn.Parameter(torch.empty(m, rank, **kw))
        self.V = nn.Parameter(torch.empty(n, rank, **kw))
        if self.deep:
            self.M = nn.Parameter(torch.eye(rank, **kw))  # deep U M V^T, M initialized to identity
        else:
            self.register_parameter("M", None)

    def _set_factors(self, U: torch.Tensor, V: torch.Tensor) -> None:
        with torch.no_grad():
            self.U.copy_(U)
            self.V.copy_(V)
            if self.M is not None:
                self.M.copy_(torch.eye(self.rank))

    def fnl_forms(self):
        view = lambda key: FactorView(key, heads=1, transpose=True)  # noqa: E731  (1 x m x r) view of U
        return [FormSpec(self.fd_kind, a=view("U"), b=view("V"), m="M" if self.deep else None)]

    def product(self) -> torch.Tensor:
        """The dense weight ``U [M] V^T``, computed in float32."""
        U = self.U.float()
        if self.M is not None:
            U = U @ self.M.float()
        return U @ self.V.float().t()

    def _left(self) -> torch.Tensor:
        return self.U if self.M is None else self.U @ self.M


class FactorizedLinear(_Factorized):
    """``y = x (U M V^T)^T + b``: a linear layer whose weight is a product of factors.

    Parameters ``U`` (out x r), ``V`` (in x r), optional ``M`` (r x r, deep), optional ``bias``.
    The forward multiplies by the factors (``(x V) M^T U^T``) when that is cheaper than forming the
    out x in product, and forms the product otherwise (overcomplete ranks).
    """

    fd_kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        deep: bool = False,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self._make_factors(out_features, in_features, rank, deep, dtype, device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, init: str = "random") -> None:
        U, V = _init(torch.empty(self.out_features, self.in_features, dtype=self.U.dtype), self.rank, init)
        self._set_factors(U, V)

    @property
    def factored_is_cheaper(self) -> bool:
        return not use_product(self.out_features, self.in_features, self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factored_is_cheaper:
            h = x @ self.V  # x V: ... x r
            if self.M is not None:
                h = h @ self.M.t()
            return F.linear(h, self.U, self.bias)  # (x V M^T) U^T + b
        return F.linear(x, self._left() @ self.V.t(), self.bias)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: Optional[int] = None,
        rank_scale: Optional[float] = None,
        init: str = "spectral",
        deep: bool = False,
        generator=None,
        fill: Optional[Fill] = None,
    ) -> "FactorizedLinear":
        """Factorize ``linear`` at ``rank`` (or ``rank_scale``); ``init='spectral'`` copies its best rank-r
        approximation, ``'random'`` and ``'dense'`` start fresh factors (``fill``: the dense layer's
        initialization, for ``'dense'``). The bias is copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        W = check_matrix("linear.weight", linear.weight)
        rank = resolve_rank(W.shape[0], W.shape[1], rank=rank, rank_scale=rank_scale)
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            deep=deep,
            dtype=W.dtype,
            device=W.device,
        )
        layer._set_factors(*_init(W, rank, init, generator, fill))
        if linear.bias is not None and layer.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight is ``product()`` (multiplied out in float32)."""
        out = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, dtype=self.U.dtype, device=self.U.device
        )
        with torch.no_grad():
            out.weight.copy_(self.product())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, deep={self.deep}"
        )


class FactorizedEmbedding(_Factorized):
    """An embedding table ``E = U [M] V^T`` (``num_embeddings x embedding_dim``), looked up as ``U[ids] M V^T``.

    ``padding_idx`` keeps ``nn.Embedding``'s semantics: row ``padding_idx`` of ``U`` is zero and receives no
    gradient, so the padding row of the product is zero and never changes. :meth:`project` computes the
    tied output projection ``x E^T = ((x V) M^T) U^T`` without forming ``E``.
    """

    fd_kind = "embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: Optional[int] = None,
        deep: bool = False,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.num_embeddings = check_positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = check_positive_int("embedding_dim", embedding_dim)
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be in [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
            padding_idx = padding_idx % num_embeddings
        self.padding_idx = padding_idx
        self._make_factors(num_embeddings, embedding_dim, rank, deep, dtype, device)
        self.reset_parameters()

    def reset_parameters(self, init: str = "random") -> None:
        weight = torch.empty(self.num_embeddings, self.embedding_dim, dtype=self.U.dtype)
        nn.init.normal_(weight)
        self._set_factors(*_init(weight, self.rank, init))
        self._zero_padding_row()

    def _zero_padding_row(self) -> None:
        if self.padding_idx is not None:
            with torch.no_grad():
                self.U[self.padding_idx].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # always the factored lookup, O(r d) per token; the product would cost O(num_embeddings d r) per call
        h = F.embedding(ids, self.U, self.padding_idx)  # U[ids]; padding row zero, no gradient
        if self.M is not None:
            h = h @ self.M
        return h @ self.V.t()  # U[ids] M V^T

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Tied output projection ``x E^T = ((x V) M^T) U^T`` (logits over the vocabulary)."""
        h = x @ self.V
        if self.M is not None:
            h = h @ self.M.t()
        return h @ self.U.t()

    @property
    def weight(self) -> torch.Tensor:
        """The dense table ``U M V^T`` (differentiable, in the factors' dtype), for code that reads ``.weight``."""
        return self._left() @ self.V.t()

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        rank: Optional[int] = None,
        rank_scale: Optional[float] = None,
        init: str = "spectral",
        deep: bool = False,
        generator=None,
        fill: Optional[Fill] = None,
    ) -> "FactorizedEmbedding":
        """Factorize ``embedding`` (as :meth:`FactorizedLinear.from_linear`; ``'dense'`` without ``fill`` draws
        ``nn.Embedding``'s ``N(0, 1)``); the padding row of ``U`` is zero."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"from_embedding expects an nn.Embedding, got {type(embedding).__name__}")
        W = check_matrix("embedding.weight", embedding.weight)
        rank = resolve_rank(W.shape[0], W.shape[1], rank=rank, rank_scale=rank_scale)
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            rank,
            embedding.padding_idx,
            deep,
            dtype=W.dtype,
            device=W.device,
        )
        if init == "dense" and fill is None:
            fill = embedding_default_fill
        layer._set_factors(*_init(W, rank, init, generator, fill))
        layer._zero_padding_row()
        return layer

    def to_embedding(self) -> nn.Embedding:
        out = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            padding_idx=self.padding_idx,
            dtype=self.U.dtype,
            device=self.U.device,
        )
        with torch.no_grad():
            out.weight.copy_(self.product())
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, padding_idx={self.padding_idx}, "
            f"deep={self.deep}"
        )
