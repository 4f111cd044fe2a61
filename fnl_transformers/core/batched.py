"""Frobenius decay (FD, paper Definition 3.2) of many forms at once: values and gradients of
``sum_f w_f / 2 ||W_f||_F^2`` over the forms ``W_f = A_f [M_f] B_f^T`` of a model or an optimizer group.

Everything is computed from small Gram matrices in float32 (float64 for float64 factors), never the m x n
product, unless the product is the cheaper route (overcomplete factors, ``k > m n / (m + n)``):

* ``||A M B^T||_F^2 = <A^T A, M (B^T B) M^T>``;
* ``d/dA 1/2 ||W||^2 = A M (B^T B) M^T``, ``d/dB = B M^T (A^T A) M``, ``d/dM = (A^T A) M (B^T B)``.

With grouped-query attention ``B`` has ``G`` heads shared by ``H / G`` query heads each.

**Plans.** :class:`FDPlan` groups forms by shape signature (factor shapes, inner matrix, dtypes, device; the
kind does not matter: every layer's QK and OV forms of a Transformer share one group). A plan holds structure
only, no tensors; it is built once and reused while the forms and their parameters keep their shapes,
dtypes and devices (:func:`model_plan` for a model, :func:`spec_plan` for a list of specs such as an
optimizer group's). Each group runs one of two ways:

* **stacked** (small forms): the group's factors are copied into one batch, and each Gram and each gradient
  product is one ``bmm`` for the whole group;
* **in place** (large forms): one ``bmm`` per form and quantity over all of its heads, reading the factors as
  strided views of the parameters and writing gradients straight into the parameters' layout (``bmm(out=)``,
  ``baddbmm_`` to accumulate): no copy at all. At these sizes a single call already runs at the machine's
  matrix-multiply peak, and a stacking copy would cost about as much as a Gram.

Coupled FD goes through one autograd node per plan (:class:`_PlanSqNorms`, closed-form backward); decoupled
FD (the optimizers) calls :meth:`FDPlan.add_grads`, which accumulates ``w_f dFD/dp`` into caller buffers
(for FLAMBe, the update direction itself) inside the matrix products.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .forms import FactorView, FormSpec, module_forms, module_lookup

# A group of forms is stacked when each form's two factors hold at most this many elements together: below it
# the per-call overhead of one bmm per form dominates; above it one bmm per form runs at the matmul peak and
# the stacking copy costs more than it saves (measured on CPU, single-threaded; see bench item 1).
STACK_MAX_ELEMENTS = 1 << 14


# ------------------------------------------------------------------------------------------ single-batch math


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any factor is float64, else float32 (half-precision factors are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def gram(X: torch.Tensor) -> torch.Tensor:
    """``X_h^T X_h`` per head (``X``: heads x rows x k, any strides)."""
    Xt = X.transpose(-1, -2)
    return torch.bmm(Xt, X) if X.dim() == 3 else Xt @ X


def expand_heads(T: torch.Tensor, H: int) -> torch.Tensor:
    """Per-group tensors (G x ...) to per-head (H x ...): head h uses group h // (H / G)."""
    G = T.shape[0]
    return T if G == H else T.repeat_interleave(H // G, dim=0)


def group_sum(T: torch.Tensor, G: int) -> torch.Tensor:
    """Per-head tensors (H x ...) summed over the heads of each group -> (G x ...)."""
    H = T.shape[0]
    return T if G == H else T.reshape(G, H // G, *T.shape[1:]).sum(1)


def use_product(m: int, n: int, k: int) -> bool:
    """The dense product (cost m n k) beats the Grams (cost (m + n) k^2) when ``k > m n / (m + n)``."""
    return k * (m + n) > m * n


def _sandwich(M: Optional[torch.Tensor], G: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``M G M^T`` (or ``M^T G M``), ``G`` itself without ``M``."""
    if M is None:
        return G
    Mt = M.transpose(-1, -2)
    return Mt @ G @ M if transpose else M @ G @ Mt


def gram_sq_norms(Ga: torch.Tensor, Gb: torch.Tensor, M: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-head ``||A_h M B_g(h)^T||_F^2 = <A^T A, M B^T B M^T>`` from the Grams (``Gb`` per head)."""
    return (Ga * _sandwich(M, Gb)).sum((-1, -2))


def gram_grads(
    A: torch.Tensor,
    B: torch.Tensor,
    M: Optional[torch.Tensor],
    Ga: torch.Tensor,
    Gb: torch.Tensor,
    w: torch.Tensor,
    need: Tuple[bool, bool, bool] = (True, True, True),
    out: Tuple[Optional[Tuple[torch.Tensor, bool]], Optional[Tuple[torch.Tensor, bool]]] = (None, None),
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Closed-form gradients of ``sum_h w_h / 2 ||A_h M B_g(h)^T||_F^2`` from the Grams: the one helper behind
    the penalty's backward, :func:`~fnl_transformers.core.form_grads` and the optimizers' decoupled FD.

    ``A``: H x m x k, ``B``: G x n x k (any strides), ``M``: k x k or H x k x k or None, ``Ga = A^T A`` (H x k x k),
    ``Gb = B^T B`` (G x k x k), ``w``: per-head weights (H,). Returns ``dA = A S_a`` with ``S_a = w M Gb M^T``,
    ``dB = B S_b`` with ``S_b = sum_{h in g} w_h M^T Ga_h M`` and the per-head ``dM_h = w_h Ga_h M Gb_g(h)``
    (H x k x k; the caller sums the heads that share ``M``). ``out[0]`` / ``out[1]``, when given, are
    ``(view, accumulate)``: the product is written into ``view`` (any strides, e.g. the parameter's own layout)
    or, with ``accumulate``, added to it by the matrix product itself (``baddbmm_``); then ``None`` is returned
    for that factor.
    """
    Sa, Sb, dM = gram_scales(Ga, Gb, M, w, need)
    dA = None if Sa is None else _times(A, Sa, out[0])
    dB = None if Sb is None else _times(B, Sb, out[1])
    return dA, dB, dM


def gram_scales(
    Ga: torch.Tensor,
    Gb: torch.Tensor,
    M: Optional[torch.Tensor],
    w: torch.Tensor,
    need: Tuple[bool, bool, bool] = (True, True, True),
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The k x k matrices of :func:`gram_grads`, from the Grams alone: ``S_a = w M Gb M^T`` per head (H x k x k;
    ``dA_h = A_h S_a,h``), ``S_b = sum_{h in g} w_h M^T Ga_h M`` per group (G x k x k; ``dB_g = B_g S_b,g``) and the
    per-head ``dM_h = w_h Ga_h M Gb_g(h)``. Any rows of ``A_h`` / ``B_g`` (a shard of them) times these matrices give
    those rows' gradients: :mod:`fnl_transformers.core.sharded` uses them on local shards."""
    H, G = Ga.shape[0], Gb.shape[0]
    w3 = w.reshape(H, 1, 1)
    Gbh = expand_heads(Gb, H)
    Sa = w3 * _sandwich(M, Gbh) if need[0] else None
    Sb = group_sum(w3 * _sandwich(M, Ga, transpose=True), G) if need[1] else None
    dM = w3 * (Ga @ M @ Gbh) if M is not None and need[2] else None
    return Sa, Sb, dM


def _times(X: torch.Tensor, S: torch.Tensor, out: Optional[Tuple[torch.Tensor, bool]]) -> Optional[torch.Tensor]:
    """``X_h S_h`` (new tensor), or written / added into ``out = (view, accumulate)`` (returns None)."""
    if out is None:
        return torch.bmm(X, S)
    view, accumulate = out
    if accumulate:
        view.baddbmm_(X, S)
    else:
        torch.bmm(X, S, out=view)
    return None


def product_terms(A, B, M):
    """Dense route: per-head ``W_h = A_h M B_g(h)^T`` (H x m x n) and ``A M``."""
    AM = A if M is None else A @ M
    return AM @ expand_heads(B, A.shape[0]).transpose(1, 2), AM


def product_grads(A, B, M, W, AM, w, need=(True, True, True)):
    """Gradients of ``sum_h w_h / 2 ||W_h||^2`` through the dense product: ``dA = w W B M^T``,
    ``dB = sum_{h in g} w_h W_h^T A_h M``, per-head ``dM_h = w_h A_h^T W_h B_g(h)``."""
    H, G = A.shape[0], B.shape[0]
    wW = w.reshape(H, 1, 1) * W
    Bh = expand_heads(B, H)
    dA = dB = dM = None
    if need[0]:
        dA = wW @ Bh if M is None else wW @ Bh @ M.transpose(-1, -2)
    if need[1]:
        dB = group_sum(wW.transpose(1, 2) @ AM, G)
    if M is not None and need[2]:
        dM = A.transpose(1, 2) @ wW @ Bh
    return dA, dB, dM


# ------------------------------------------------------------------------------------------ plans


def _factor_shape(view: FactorView, shape: Sequence[int]) -> Tuple[int, int, int]:
    """``(heads, dim, head_dim)`` of the batched factor ``view`` reads from a 2-D tensor of ``shape``."""
    if len(shape) != 2:
        raise ValueError(f"{view.key}: factors must be 2-D parameters, got shape {tuple(shape)}")
    rows, cols = (shape[1], shape[0]) if view.transpose else (shape[0], shape[1])
    start, stop, _ = slice(view.start, view.stop).indices(rows)
    rows = max(0, stop - start)
    if view.heads <= 0 or rows % view.heads:
        raise ValueError(f"{view.key}: {rows} rows do not split into {view.heads} heads")
    return view.heads, cols, rows // view.heads


def _covers(view: FactorView, shape: Sequence[int]) -> bool:
    rows = shape[1] if view.transpose else shape[0]
    start, stop, _ = slice(view.start, view.stop).indices(rows)
    return start == 0 and stop == rows


@dataclass(frozen=True)
class _Slot:
    """One form of a group: its position in the plan's form order, its factor views and the indices of the
    tensors they read (``im``: the inner matrix's, or None)."""

    pos: int
    a: FactorView
    b: FactorView
    ia: int
    ib: int
    im: Optional[int]


def _index(key: Hashable) -> int:
    if not isinstance(key, int) or isinstance(key, bool):
        raise ValueError(f"plan keys must be indices into the plan's tensors, got {key!r}")
    return key


@dataclass
class _Group:
    H: int
    m: int
    G: int
    n: int
    k: int
    deep: bool
    product: bool  # dense route (overcomplete factors)
    stacked: bool
    dtype: torch.dtype  # compute dtype
    slots: List[_Slot]
    first: int = 0  # position of the first slot; slots occupy first .. first + len(slots) - 1


Meta = Tuple[torch.Size, torch.dtype, torch.device]


class FDPlan:
    """Forms grouped by shape signature, ready to run on the tensors they read.

    ``specs``: form specs whose keys are indices into the tensor list the plan runs on; ``metas``: the
    ``(shape, dtype, device)`` of those tensors. Forms of a group keep their relative order; ``kinds[pos]`` is
    the kind of the form at position ``pos`` of the plan's order (values come out in that order).
    """

    def __init__(self, specs: Sequence[FormSpec], metas: Sequence[Meta], stack_max: Optional[int] = None):
        stack_max = STACK_MAX_ELEMENTS if stack_max is None else stack_max
        by_sig: "OrderedDict[tuple, List[Tuple[int, FormSpec]]]" = OrderedDict()
        uses: Dict[int, List[bool]] = {}  # tensor index -> one entry per use: does it cover the whole tensor
        for i, spec in enumerate(specs):
            ia, ib, im = _index(spec.a.key), _index(spec.b.key), None if spec.m is None else _index(spec.m)
            (sa, da, dev), (sb, db, devb) = metas[ia], metas[ib]
            H, m, k = _factor_shape(spec.a, sa)
            G, n, kb = _factor_shape(spec.b, sb)
            if kb != k or H % G:
                raise ValueError(
                    f"{spec.kind} form: factors of {H} x {m} x {k} and {G} x {n} x {kb} (heads x dim x "
                    "head_dim) do not pair"
                )
            dm = None
            if im is not None:
                sm, dm, devm = metas[im]
                if tuple(sm) != (k, k) or devm != dev:
                    raise ValueError(f"{spec.kind} form: inner matrix of shape {tuple(sm)}, expected ({k}, {k})")
            if devb != dev:
                raise ValueError(f"{spec.kind} form: factors on different devices ({dev} and {devb})")
            sig = (H, m, k, G, n, im is not None, da, db, dm, dev)
            by_sig.setdefault(sig, []).append((i, spec))
            uses.setdefault(ia, []).append(_covers(spec.a, sa))
            uses.setdefault(ib, []).append(_covers(spec.b, sb))
            if im is not None:
                uses.setdefault(im, []).append(True)
        self.groups: List[_Group] = []
        self.kinds: List[str] = []
        for (H, m, k, G, n, deep, da, db, dm, _), members in by_sig.items():
            product = use_product(m, n, k)
            stacked = len(members) > 1 and not product and H * m * k + G * n * k <= stack_max
            group = _Group(H, m, G, n, k, deep, product, stacked, compute_dtype_of(da, db, dm), [], len(self.kinds))
            for _, spec in members:
                ia, ib = _index(spec.a.key), _index(spec.b.key)
                im = None if spec.m is None else _index(spec.m)
                group.slots.append(_Slot(len(self.kinds), spec.a, spec.b, ia, ib, im))
                self.kinds.append(spec.kind)
            self.groups.append(group)
        # a tensor read by exactly one view that covers it gets its gradient written, not accumulated
        self.single_use = {idx: u == [True] for idx, u in uses.items()}
        self.device = metas[0][2] if metas else torch.device("cpu")
        self.dtype = torch.float64 if any(g.dtype == torch.float64 for g in self.groups) else torch.float32
        self._kind_index: Dict[Tuple[str, ...], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.kinds)

    def kind_index(self, kinds: Tuple[str, ...]) -> torch.Tensor:
        """Index of each form's kind in ``kinds`` (a cached tensor on the plan's device)."""
        idx = self._kind_index.get(kinds)
        if idx is None:
            idx = self._kind_index[kinds] = torch.tensor([kinds.index(k) for k in self.kinds], device=self.device)
        return idx

    # -------------------------------------------------------------------------- values

    def sq_norms(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``||W_f||_F^2`` of every form (summed over heads), in plan order; differentiable (closed-form backward)."""
        return _PlanSqNorms.apply(self, *tensors)

    def _values(self, tensors, keep: bool):
        vals, saved = [], []
        for g in self.groups:
            run = _product_values if g.product else _stacked_values if g.stacked else _inplace_values
            v, s = run(g, tensors, keep)
            vals.append(v)
            saved.append(s)
        vals = [cast(v, self.dtype) for v in vals]
        return (torch.cat(vals) if len(vals) > 1 else vals[0]), saved

    # -------------------------------------------------------------------------- gradients

    def add_grads(
        self,
        tensors: Sequence[torch.Tensor],
        weights: torch.Tensor,
        out: Dict[int, torch.Tensor],
        need: Optional[Sequence[bool]] = None,
        saved=None,
    ) -> Dict[int, torch.Tensor]:
        """``out[i] += sum_f weights[f] * d(1/2 ||W_f||_F^2)/d tensors[i]`` (plan order ``f``), for every tensor
        ``i`` with ``need[i]`` (default all). Missing buffers are created in the compute dtype (float32 or
        float64) with the tensor's layout; buffers given in ``out`` receive the products in place."""
        sink = _Sink(self, tensors, out, need)
        weights = cast(weights, self.dtype)
        if saved is None:
            _, saved = self._values(tensors, keep=True)
        for g, s in zip(self.groups, saved):
            w = cast(weights[g.first : g.first + len(g.slots)], g.dtype)
            run = _product_grads if g.product else _stacked_grads if g.stacked else _inplace_grads
            run(g, tensors, s, w, sink)
        sink.finish()
        return out


def compute_dtype_of(*dtypes: Optional[torch.dtype]) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


class _PlanSqNorms(torch.autograd.Function):
    """``||W_f||_F^2`` of every form of a plan; backward through :func:`gram_grads` (``d/dA = 2 A M Gb M^T``, ...)
    straight into each parameter's layout: no view, transpose or copy nodes between the penalty and the
    parameters."""

    @staticmethod
    def forward(ctx, plan: FDPlan, *tensors):
        values, saved = plan._values(tensors, keep=any(t.requires_grad for t in tensors))
        ctx.plan, ctx.saved = plan, saved
        ctx.save_for_backward(*tensors)
        return values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        tensors = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        grads: Dict[int, torch.Tensor] = {}
        ctx.plan.add_grads(tensors, 2 * g, grads, need=need, saved=ctx.saved)
        ctx.saved = None
        return (None, *(None if i not in grads else cast(grads[i], t.dtype) for i, t in enumerate(tensors)))


class _Sink:
    """Where a gradient product goes: a view of the tensor's buffer in ``out``, written or accumulated."""

    def __init__(self, plan: FDPlan, tensors, out: Dict[int, torch.Tensor], need):
        self.plan, self.tensors, self.out = plan, tensors, out
        self.need = need
        self.pending: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (target, temp) for buffers of another dtype

    def wants(self, idx: int) -> bool:
        return self.need is None or bool(self.need[idx])

    def target(self, idx: int, view: Optional[FactorView], dtype: torch.dtype) -> Tuple[torch.Tensor, bool]:
        """``(view of idx's buffer, accumulate)`` to receive a product in ``dtype``."""
        buf = self.out.get(idx)
        if buf is None:
            t = self.tensors[idx]
            if self.plan.single_use.get(idx, False):
                buf = torch.empty_like(t, dtype=dtype)  # keeps t's strides: products land in its layout
                fresh = True
            else:
                buf = torch.zeros_like(t, dtype=dtype)
                fresh = False
            self.out[idx] = buf
        else:
            fresh = False
        if buf.dtype != dtype:  # e.g. a half-precision update buffer: compute in dtype, add at the end
            tmp = torch.zeros_like(buf, dtype=dtype)
            self.pending.append((buf, tmp))
            buf, fresh = tmp, False
        target = buf if view is None else view.view(buf)
        return target, not fresh

    def put(self, idx: int, view: Optional[FactorView], value: torch.Tensor) -> None:
        target, accumulate = self.target(idx, view, value.dtype)
        if accumulate:
            target.add_(value)
        else:
            target.copy_(value)

    def finish(self) -> None:
        for buf, tmp in self.pending:
            buf.add_(tmp)
        self.pending.clear()


def _needs(slot: _Slot, sink: "_Sink") -> Tuple[bool, bool, bool]:
    return sink.wants(slot.ia), sink.wants(slot.ib), slot.im is not None and sink.wants(slot.im)


def _put(slot: _Slot, sink: "_Sink", dA, dB, dM) -> None:
    """Products not already written in place: into (or onto) the buffers of the slot's tensors; ``dM`` per head."""
    if dA is not None:
        sink.put(slot.ia, slot.a, dA)
    if dB is not None:
        sink.put(slot.ib, slot.b, dB)
    if dM is not None and slot.im is not None:
        sink.put(slot.im, None, dM.sum(0))


def _views(slot: _Slot, tensors, dtype):
    A = cast(slot.a.view(tensors[slot.ia]), dtype)
    B = cast(slot.b.view(tensors[slot.ib]), dtype)
    M = None if slot.im is None else cast(tensors[slot.im], dtype)
    return A, B, M


# in place: one bmm per form and quantity, directly on the parameters' memory
def _inplace_values(g: _Group, tensors, keep: bool):
    vals, saved = [], []
    for slot in g.slots:
        A, B, M = _views(slot, tensors, g.dtype)
        Ga, Gb = gram(A), gram(B)
        vals.append(gram_sq_norms(Ga, expand_heads(Gb, g.H), M).sum())
        if keep:
            saved.append((Ga, Gb))
    return torch.stack(vals), saved


def _inplace_grads(g: _Group, tensors, saved, w: torch.Tensor, sink: _Sink):
    for slot, (Ga, Gb), wf in zip(g.slots, saved, w.unbind()):
        A, B, M = _views(slot, tensors, g.dtype)
        need = _needs(slot, sink)
        out = (
            sink.target(slot.ia, slot.a, g.dtype) if need[0] else None,
            sink.target(slot.ib, slot.b, g.dtype) if need[1] else None,
        )
        dA, dB, dM = gram_grads(A, B, M, Ga, Gb, wf.expand(g.H), need, out)
        _put(slot, sink, dA, dB, dM)


# stacked: the group's factors copied into one batch, one bmm per quantity for the whole group
def _stacked_values(g: _Group, tensors, keep: bool):
    F = len(g.slots)
    A = torch.stack([cast(s.a.view(tensors[s.ia]), g.dtype) for s in g.slots]).reshape(F * g.H, g.m, g.k)
    B = torch.stack([cast(s.b.view(tensors[s.ib]), g.dtype) for s in g.slots]).reshape(F * g.G, g.n, g.k)
    M = None
    if g.deep:
        M = torch.stack([cast(tensors[_index(s.im)], g.dtype) for s in g.slots])  # F x k x k
        M = M.unsqueeze(1).expand(F, g.H, g.k, g.k).reshape(F * g.H, g.k, g.k)
    Ga, Gb = gram(A), gram(B)
    vals = gram_sq_norms(Ga, expand_heads(Gb, F * g.H), M).view(F, g.H).sum(1)
    return vals, ((A, B, M, Ga, Gb) if keep else None)


def _stacked_grads(g: _Group, tensors, saved, w: torch.Tensor, sink: _Sink):
    A, B, M, Ga, Gb = saved
    needs = [_needs(slot, sink) for slot in g.slots]
    need = (any(n[0] for n in needs), any(n[1] for n in needs), any(n[2] for n in needs))
    dA, dB, dM = gram_grads(A, B, M, Ga, Gb, w.repeat_interleave(g.H), need)
    for f, (slot, n) in enumerate(zip(g.slots, needs)):
        heads, groups = slice(f * g.H, (f + 1) * g.H), slice(f * g.G, (f + 1) * g.G)
        _put(
            slot,
            sink,
            None if dA is None or not n[0] else dA[heads],
            None if dB is None or not n[1] else dB[groups],
            None if dM is None or not n[2] else dM[heads],
        )


# dense route (overcomplete factors): per form, through the m x n product
def _product_values(g: _Group, tensors, keep: bool):
    vals, saved = [], []
    for slot in g.slots:
        A, B, M = _views(slot, tensors, g.dtype)
        W, AM = product_terms(A, B, M)
        vals.append(W.pow(2).sum())
        if keep:
            saved.append((W, AM))
    return torch.stack(vals), saved


def _product_grads(g: _Group, tensors, saved, w: torch.Tensor, sink: _Sink):
    for slot, (W, AM), wf in zip(g.slots, saved, w.unbind()):
        A, B, M = _views(slot, tensors, g.dtype)
        dA, dB, dM = product_grads(A, B, M, W, AM, wf.expand(g.H), _needs(slot, sink))
        _put(slot, sink, dA, dB, dM)


# ------------------------------------------------------------------------------------------ plan caches


def _meta(t: torch.Tensor) -> Meta:
    return (t.shape, t.dtype, t.device)


_SPEC_PLANS: "OrderedDict[tuple, FDPlan]" = OrderedDict()
_SPEC_PLANS_MAX = 32


def spec_plan(specs: Sequence[FormSpec], lookup: Callable[[Hashable], torch.Tensor]):
    """``(plan, tensors)`` for ``specs`` whose keys ``lookup`` resolves (e.g. an optimizer group's specs and its
    params). Plans are cached by structure (the specs, which keys name the same tensor, and the tensors'
    shapes, dtypes and devices): a step with unchanged parameters only resolves keys and compares."""
    tensors: List[torch.Tensor] = []
    index: Dict[int, int] = {}
    refs = []

    def idx(key):
        t = lookup(key)
        i = index.get(id(t))
        if i is None:
            i = index[id(t)] = len(tensors)
            tensors.append(t)
        return i

    for spec in specs:
        refs.append((spec, idx(spec.a.key), idx(spec.b.key), None if spec.m is None else idx(spec.m)))
    key = (tuple(refs), tuple(_meta(t) for t in tensors))
    plan = _SPEC_PLANS.get(key)
    if plan is None:
        plan = FDPlan([_rekey(spec, ia, ib, im) for spec, ia, ib, im in refs], key[1])
        _SPEC_PLANS[key] = plan
        if len(_SPEC_PLANS) > _SPEC_PLANS_MAX:
            _SPEC_PLANS.popitem(last=False)
    else:
        _SPEC_PLANS.move_to_end(key)
    return plan, tensors


def _rekey(spec: FormSpec, ia: int, ib: int, im: Optional[int]) -> FormSpec:
    keys: Dict[Hashable, Optional[int]] = {spec.a.key: ia, spec.b.key: ib}
    if spec.m is not None:
        keys[spec.m] = im
    if spec.a.key == spec.b.key and ia != ib:  # cannot happen: one key, one tensor
        raise AssertionError("one key resolved to two tensors")
    return spec.with_keys(keys.__getitem__)


_MODEL_PLANS: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, tuple]]" = weakref.WeakKeyDictionary()


def _walk(model: nn.Module) -> List[nn.Module]:
    """``model.modules()`` (pre-order, each module once), without building the qualified names."""
    out, seen, stack = [], set(), [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out.append(module)
        stack.extend(reversed([c for c in module._modules.values() if c is not None]))
    return out


def model_plan(model: nn.Module, kinds: Sequence[str]):
    """``(plan, tensors)`` for the forms of ``kinds`` in ``model``, or ``(None, [])`` when it has none.

    The plan is cached per model and reused while every form is the same and reads the same parameters with
    the same shapes, dtypes and devices; anything else (a replaced module or parameter, ``.to()``, ``.half()``,
    new forms) builds a new one. The check walks the modules each call: no stale plan after model surgery."""
    tensors: List[torch.Tensor] = []
    index: Dict[int, int] = {}
    refs = []
    for module in _walk(model):
        specs = module_forms(module)
        if not specs:
            continue
        get = None
        for spec in specs:
            if spec.kind not in kinds:
                continue
            get = get or module_lookup(module)
            ids = []
            for key in spec.keys():
                t = get(key)
                i = index.get(id(t))
                if i is None:
                    i = index[id(t)] = len(tensors)
                    tensors.append(t)
                ids.append(i)
            refs.append((spec, ids[0], ids[1], ids[2] if len(ids) > 2 else None))
    if not refs:
        return None, []
    key = (tuple(refs), tuple(_meta(t) for t in tensors))
    try:
        per_model = _MODEL_PLANS.setdefault(model, {})
    except TypeError:  # a module class that is not hashable or weak-referenceable: no cache
        per_model = {}
    kinds_key = tuple(kinds)
    cached = per_model.get(kinds_key)
    if cached is not None and cached[0] == key:
        return cached[1], tensors
    plan = FDPlan([_rekey(*ref) for ref in refs], key[1])
    per_model[kinds_key] = (key, plan)
    return plan, tensors
