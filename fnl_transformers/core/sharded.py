"""Frobenius decay (FD, paper Definition 3.2) on factors whose parameters are sharded across processes.

Everything FD needs is a k x k Gram matrix per head (paper Sec. 2.3, Eq. (1) for the attention forms): for a form
``W_h = A_h [M] B_g(h)^T`` with ``A_h`` (m x k), ``B_g`` (n x k),

* ``||W_h||_F^2 = <A_h^T A_h, M B_g^T B_g M^T>``;
* ``dFD/dA_h = A_h (M B_g^T B_g M^T)``, ``dFD/dB_g = B_g M^T (sum_{h in g} A_h^T A_h) M``,
  ``dFD/dM = sum_h A_h^T A_h M B_g^T B_g``.

Each factor is read, as in :class:`~fnl_transformers.core.forms.FactorView`, from the "row space" of a 2-D
parameter: ``heads * k`` rows (the parameter, or its transpose) by ``m`` columns, ``A_h^T`` being the rows of
head ``h``. A sharded parameter (FSDP2 ``fully_shard`` holds one ``torch.chunk`` of it along one dimension per
process, :class:`ShardLayout`) is split either

* along the **contracted dimension** ``m`` (the row-space columns): FSDP2's default dim-0 sharding of a
  factorized layer's ``U`` (m x r) and ``V`` (n x r), of an embedding table, of an attention output projection
  ``o_proj`` (d x heads*k); or q/k/v projections sharded along their input dimension
  (``shard_placement_fn=lambda p: Shard(1)``). Each process holds some rows of every ``A_h``, and
  ``A_h^T A_h = sum_p A_h,p^T A_h,p``: the local Grams are partial sums, completed by one all-reduce; or
* along **heads** (the row-space rows): FSDP2's default dim-0 sharding of q/k/v projections
  (heads*k x d). A process holds whole heads, whose Grams are complete locally. A shard boundary inside a
  head would need that head's factor columns on two processes and is refused (shard that parameter along its
  other dimension, or use a number of processes that divides the heads). Where both factors of a form are
  sharded along heads with the same owners (q and k of one attention: equal shapes, equal chunks), each
  head's whole FD term is local: no k x k piece moves at all. Otherwise the owner's Grams join the all-reduce
  (zeros from the other processes).

A replicated parameter (no sharding) has complete Grams everywhere; a sharded deep-form ``M`` (k x k) is
completed by the same all-reduce. Gradients are computed on the local rows only (``A_p (M G_b M^T)``), in the
local shard's layout: a process never holds more of a factor than its own shard. Per call there is **one**
``all_reduce`` of a flat float32 buffer: the upper triangles of the Grams that are partial or owned
(``k (k + 1) / 2`` numbers per head; Grams are symmetric), the sharded ``M``s, and the partial sum of the
penalty over the heads that are local to their process. Every collective goes through a :class:`Comm`, whose
:class:`CommLog` counts the bytes; :func:`fd_comm_log` runs the same code on meta tensors (no process group)
to count what one update sends for a given model and sharding.

The penalty and the gradients equal :func:`~fnl_transformers.core.frobenius.frobenius_penalty` and
:func:`~fnl_transformers.core.frobenius.fd_grads` of the unsharded model (tests: 2 gloo processes, 1e-5).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .batched import expand_heads, gram, gram_scales, gram_sq_norms
from .forms import FactorView, FormSpec, module_forms

if TYPE_CHECKING:
    from typing import TypeGuard

    from torch.distributed.tensor import DTensor

# ---------------------------------------------------------------- layouts


@dataclass(frozen=True)
class ShardLayout:
    """This process's part of a 2-D parameter of full ``shape``: chunk ``rank`` of ``world_size`` along ``dim``
    (``torch.chunk``'s rule, FSDP2's: ``ceil(n / world_size)`` per process, the last ones shorter or empty), or
    the whole parameter when ``dim`` is None (replicated)."""

    shape: Tuple[int, int]
    dim: Optional[int] = None
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if len(self.shape) != 2:
            raise ValueError(f"ShardLayout: a factor parameter must be 2-D, got shape {tuple(self.shape)}")
        if self.dim not in (None, 0, 1):
            raise ValueError(f"ShardLayout: dim must be 0, 1 or None, got {self.dim!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"ShardLayout: rank {self.rank} is not in [0, {self.world_size})")

    @classmethod
    def replicated(cls, shape) -> "ShardLayout":
        return cls(tuple(shape))

    def span(self, rank: Optional[int] = None) -> Tuple[int, int]:
        """``[start, stop)`` along ``dim`` held by ``rank`` (default: this process)."""
        if self.dim is None:
            return 0, self.shape[0]
        rank = self.rank if rank is None else rank
        n = self.shape[self.dim]
        c = -(-n // self.world_size)
        start = min(rank * c, n)
        return start, min(start + c, n)

    def local_shape(self) -> Tuple[int, int]:
        if self.dim is None:
            return self.shape[0], self.shape[1]
        start, stop = self.span()
        rows, cols = self.shape
        return (stop - start, cols) if self.dim == 0 else (rows, stop - start)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This process's shard of the full tensor (a view)."""
        if self.dim is None:
            return full
        start, stop = self.span()
        return full.narrow(self.dim, start, stop - start)

    @classmethod
    def of_dtensor(cls, p) -> "ShardLayout":
        """The layout of an FSDP2 parameter (a DTensor on a 1-D mesh, ``Shard(d)`` or ``Replicate()``)."""
        mesh, placements = p.device_mesh, p.placements
        if mesh.ndim != 1 or len(placements) != 1:
            raise ValueError(f"ShardLayout.of_dtensor: only 1-D meshes are supported, got placements {placements}")
        dim = getattr(placements[0], "dim", None)
        if dim is None and not placements[0].is_replicate():
            raise ValueError(f"ShardLayout.of_dtensor: unsupported placement {placements[0]}")
        return cls(tuple(p.shape), dim, mesh.get_local_rank(), mesh.size())


@dataclass
class Sharded:
    """A parameter as one process holds it: its ``local`` shard and the ``layout`` saying which part."""

    local: torch.Tensor
    layout: ShardLayout

    def __post_init__(self):
        if tuple(self.local.shape) != self.layout.local_shape():
            raise ValueError(
                f"Sharded: local shape {tuple(self.local.shape)} does not match the layout's "
                f"{self.layout.local_shape()} ({self.layout})"
            )


# ---------------------------------------------------------------- communication


@dataclass
class CommLog:
    """Every collective issued: ``(op, numel, bytes)``."""

    calls: List[Tuple[str, int, int]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(b for _, _, b in self.calls)

    @property
    def numel(self) -> int:
        return sum(n for _, n, _ in self.calls)


class Comm:
    """Sum-all-reduce over a ``torch.distributed`` process group (default: the world), logged."""

    def __init__(self, group=None):
        self.group = group
        self.log = CommLog()

    def all_reduce(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        self.log.calls.append(("all_reduce", t.numel(), t.numel() * t.element_size()))
        dist.all_reduce(t, group=self.group)


class DryRunComm(Comm):
    """Logs the collectives one process would issue, sends nothing (for meta tensors: counting bytes)."""

    def all_reduce(self, t: torch.Tensor) -> None:
        self.log.calls.append(("all_reduce", t.numel(), t.numel() * t.element_size()))


# ---------------------------------------------------------------- factors on shards


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass
class _Factor:
    """One factor (a FactorView) of a sharded parameter, as this process holds it."""

    key: Hashable
    view: FactorView
    layout: ShardLayout
    heads: int
    k: int
    mode: str  # "full" (replicated), "partial" (split along the contracted dim), "owned" (split along heads)
    first: int  # heads [first, last) are present locally (all of them unless "owned")
    last: int
    row0: int  # first local row-space row of head `first`

    def batched(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(last - first) x m_local x k`` view of the local shard ``tensor`` (or of a buffer shaped like it)."""
        rows = tensor.t() if self.view.transpose else tensor
        n = (self.last - self.first) * self.k
        rows = rows[self.row0 : self.row0 + n]
        return rows.view(self.last - self.first, self.k, rows.shape[1]).transpose(1, 2)


def _row_space(view: FactorView, layout: ShardLayout):
    """(rows of the full row space, row-space dim the parameter is split along or None)."""
    rows_full = layout.shape[1] if view.transpose else layout.shape[0]
    if layout.dim is None:
        return rows_full, None
    return rows_full, (1 - layout.dim) if view.transpose else layout.dim


def _owned_heads(view: FactorView, layout: ShardLayout, rank: int, f0: int, k: int, heads: int):
    """Heads [first, last) that ``rank`` holds of a head-split factor, and the local row of the first one."""
    assert layout.dim is not None, "a head-split factor is sharded along a dimension"
    lo, hi = layout.span(rank)
    a, b = max(lo, f0), min(hi, f0 + heads * k)
    if a >= b:
        return 0, 0, 0
    if (a - f0) % k or (b - f0) % k:
        h = (a - f0) // k if (a - f0) % k else (b - f0) // k
        raise ValueError(
            f"{view.key}: the shard of process {rank} (rows {lo}..{hi} of dim {layout.dim}) splits head {h} "
            f"({k} rows per head); shard this parameter along dim {1 - layout.dim} (FSDP2 shard_placement_fn) "
            f"or use a number of processes that divides its {heads} heads"
        )
    return (a - f0) // k, (b - f0) // k, a - lo


def _factor(view: FactorView, sh: Sharded) -> _Factor:
    layout = sh.layout
    rows_full, split = _row_space(view, layout)
    f0 = view.start
    f1 = rows_full if view.stop is None else view.stop
    if (f1 - f0) % view.heads:
        raise ValueError(f"{view.key}: {f1 - f0} rows do not split into {view.heads} heads")
    k = (f1 - f0) // view.heads
    if split is None or split == 1:
        mode = "full" if split is None else "partial"
        return _Factor(view.key, view, layout, view.heads, k, mode, 0, view.heads, f0)
    for r in range(layout.world_size):  # every process reaches the same verdict (no one-sided error)
        _owned_heads(view, layout, r, f0, k, view.heads)
    first, last, row0 = _owned_heads(view, layout, layout.rank, f0, k, view.heads)
    return _Factor(view.key, view, layout, view.heads, k, "owned", first, last, row0)


def _same_owners(fa: _Factor, fb: _Factor) -> bool:
    """Every process holds the same heads of both factors (checked for all processes, not only this one)."""
    if fa.mode != "owned" or fb.mode != "owned" or fa.heads != fb.heads or fa.k != fb.k:
        return False
    if fa.layout.world_size != fb.layout.world_size:
        return False
    for r in range(fa.layout.world_size):
        ha = _owned_heads(fa.view, fa.layout, r, fa.view.start, fa.k, fa.heads)[:2]
        hb = _owned_heads(fb.view, fb.layout, r, fb.view.start, fb.k, fb.heads)[:2]
        if ha != hb:
            return False
    return True


# ---------------------------------------------------------------- FD on shards


def sharded_fd(
    specs: Iterable[FormSpec],
    lookup: Callable[[Any], Sharded],
    coeffs: Dict[str, float],
    comm: Comm,
) -> Tuple[torch.Tensor, Dict[Hashable, torch.Tensor]]:
    """FD penalty ``sum_forms lambda_kind / 2 ||W||_F^2`` (the same float32 scalar on every process) and
    ``{key: lambda_kind * dFD/d(local shard)}`` (float32, float64 for float64 shards; shaped as each local shard;
    keys that name the same local tensor share one gradient tensor), from local shards and one all-reduce of k x k
    pieces.

    ``lookup(key)`` returns the :class:`Sharded` parameter a spec names, the same object for keys that name
    one parameter (tied or fused factors: one Gram, one gradient). Every process must call this with the same
    specs in the same order: they lay out the all-reduce buffer."""
    factors: Dict[tuple, Tuple[_Factor, Sharded]] = {}  # one Gram per distinct factor (tied ones recur)

    def factor(view: FactorView) -> tuple:
        sh = lookup(view.key)
        ident = (id(sh.local), view.heads, view.transpose, view.start, view.stop)
        if ident not in factors:
            factors[ident] = (_factor(view, sh), sh)
        return ident

    forms = []
    for spec in specs:
        lam = float(coeffs.get(spec.kind, 0.0))
        if not lam:
            continue
        ia, ib = factor(spec.a), factor(spec.b)
        fa, fb = factors[ia][0], factors[ib][0]
        if fa.k != fb.k or fa.heads % fb.heads:
            raise ValueError(
                f"{spec.kind} form {spec.a.key} / {spec.b.key}: factors of {fa.heads} heads x {fa.k} "
                f"and {fb.heads} heads x {fb.k} do not pair"
            )
        m = None if spec.m is None else lookup(spec.m)
        local = m is None and _same_owners(fa, fb)  # dM would need every head: deep forms are never local
        forms.append(_Form(spec, lam, ia, ib, m, local))
    if not forms:
        return torch.zeros(()), {}
    device = factors[forms[0].a][1].local.device

    # Grams of the local rows / heads (float32, heads x k x k; zeros for heads held by other processes)
    grams: Dict[tuple, torch.Tensor] = {}
    for ident, (f, sh) in factors.items():
        A = _f32(f.batched(sh.local))
        G = A.new_zeros(f.heads, f.k, f.k)
        G[f.first : f.last] = gram(A)
        grams[ident] = G

    # what travels: Grams used by a form that is not local to its heads (unless replicated), sharded Ms
    travel: List[tuple] = []
    for form in forms:
        if not form.local:
            travel += [i for i in (form.a, form.b) if factors[i][0].mode != "full" and i not in travel]
    ms: Dict[int, torch.Tensor] = {}
    m_travel: List[int] = []
    for form in forms:
        m = form.m
        if m is not None and id(m.local) not in ms:
            M_full = _f32(m.local)
            if m.layout.dim is not None:  # rows/columns of M from every process, zeros elsewhere
                start, stop = m.layout.span()
                full = M_full.new_zeros(m.layout.shape)
                full.narrow(m.layout.dim, start, stop - start).copy_(M_full)
                M_full = full
                m_travel.append(id(m.local))
            ms[id(m.local)] = M_full

    # forms local to their heads: penalty of this process's heads, summed across processes by the all-reduce
    local_penalty = torch.zeros((), dtype=grams[forms[0].a].dtype, device=device)
    for form in forms:
        if form.local:
            fa = factors[form.a][0]
            Ga, Gb = grams[form.a][fa.first : fa.last], grams[form.b][fa.first : fa.last]
            local_penalty = local_penalty + gram_sq_norms(Ga, Gb, None).sum() * (form.lam / 2)
    any_local = any(form.local for form in forms)

    if travel or m_travel or any_local:
        pieces = []
        for ident in travel:
            i, j = torch.triu_indices(factors[ident][0].k, factors[ident][0].k, device=device)
            pieces.append(grams[ident][:, i, j].reshape(-1))  # Grams are symmetric: upper triangles only
        pieces += [ms[i].reshape(-1) for i in m_travel]
        if any_local:
            pieces.append(local_penalty.reshape(1))
        buf = torch.cat(pieces)
        comm.all_reduce(buf)
        offset = 0
        for ident in travel:
            f = factors[ident][0]
            i, j = torch.triu_indices(f.k, f.k, device=device)
            tri = buf[offset : offset + f.heads * i.numel()].view(f.heads, -1)
            offset += int(tri.numel())
            G = tri.new_zeros(f.heads, f.k, f.k)
            G[:, i, j] = tri
            G[:, j, i] = tri
            grams[ident] = G
        for mid in m_travel:
            n = int(ms[mid].numel())
            ms[mid] = buf[offset : offset + n].view_as(ms[mid])
            offset += n
        if any_local:
            local_penalty = buf[offset]

    # the penalty and the gradients of the local rows
    penalty = local_penalty
    grads: Dict[Hashable, torch.Tensor] = {}
    by_tensor: Dict[int, torch.Tensor] = {}

    def grad_buffer(key: Hashable, local: torch.Tensor) -> torch.Tensor:
        if id(local) not in by_tensor:
            dtype = torch.float64 if local.dtype == torch.float64 else torch.float32
            by_tensor[id(local)] = torch.zeros(local.shape, dtype=dtype, device=local.device)
        grads[key] = by_tensor[id(local)]
        return grads[key]

    for form in forms:  # the formulas are core.batched's; here they run on the local rows of each factor
        (fa, sa), (fb, sb) = factors[form.a], factors[form.b]
        Ga, Gb = grams[form.a], grams[form.b]
        M = None if form.m is None else ms[id(form.m.local)]
        if not form.local:
            penalty = penalty + gram_sq_norms(Ga, expand_heads(Gb, fa.heads), M).sum() * (form.lam / 2)
        w = Ga.new_full((fa.heads,), form.lam)  # gradients of lambda/2 ||W_h||_F^2
        Sa, Sb, dM = gram_scales(Ga, Gb, M, w)  # dA_h = A_h Sa_h, dB_g = B_g Sb_g, per-head dM
        assert Sa is not None and Sb is not None
        fa.batched(grad_buffer(form.spec.a.key, sa.local)).baddbmm_(_f32(fa.batched(sa.local)), Sa[fa.first : fa.last])
        fb.batched(grad_buffer(form.spec.b.key, sb.local)).baddbmm_(_f32(fb.batched(sb.local)), Sb[fb.first : fb.last])
        if dM is not None and form.m is not None:
            grad_buffer(form.spec.m, form.m.local).add_(form.m.layout.take(dM.sum(0)))
    return penalty, grads


@dataclass
class _Form:
    spec: FormSpec
    lam: float
    a: tuple
    b: tuple
    m: Optional[Sharded]
    local: bool


# ---------------------------------------------------------------- parameters held as DTensors (FSDP2)


def is_dtensor(t: Any) -> "TypeGuard[DTensor]":
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 ``fully_shard`` parameter or gradient)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return False
    return isinstance(t, DTensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view sharing its memory); any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def as_sharded(p: torch.Tensor) -> Sharded:
    """A parameter as :func:`sharded_fd` reads it: a DTensor's local shard and layout, a plain tensor replicated."""
    p = p.detach()
    if is_dtensor(p):
        return Sharded(p.to_local(), ShardLayout.of_dtensor(p))
    return Sharded(p, ShardLayout.replicated(p.shape))


def mesh_group(tensors: Iterable[torch.Tensor]):
    """The process group of the first DTensor's (1-D) device mesh, or None (the default group) when none is one."""
    for t in tensors:
        if is_dtensor(t):
            return t.device_mesh.get_group()
    return None


def accumulate_sharded_fd_grads(
    specs: Sequence[FormSpec],
    lookup: Callable[[Any], torch.Tensor],
    coeffs: Dict[str, float],
    out: Optional[Dict[int, torch.Tensor]] = None,
    comm: Optional[Comm] = None,
) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
    """:func:`~fnl_transformers.core.frobenius.accumulate_fd_grads` for parameters that are DTensors (FSDP2): the
    FD penalty and ``out[id(p)] += lambda_kind * dFD/dp``, by :func:`sharded_fd` from the local shards and one
    all-reduce (``comm``, default: over the parameters' device mesh).

    A buffer already in ``out`` may be a DTensor laid out as its parameter or a tensor of the local shard's shape
    (e.g. an optimizer's local update direction); the local rows are added in place. Missing buffers are created:
    a DTensor with the parameter's placements (float32) for a DTensor parameter, else a plain tensor. Every
    process must call this with the same specs in the same order."""
    out = {} if out is None else out
    held: Dict[int, Tuple[torch.Tensor, Sharded]] = {}  # one Sharded per parameter: tied keys share their Gram

    def shard(key: Any) -> Sharded:
        p = lookup(key)
        if id(p) not in held:
            held[id(p)] = (p, as_sharded(p))
        return held[id(p)][1]

    specs = list(specs)
    if comm is None:
        comm = Comm(mesh_group(lookup(k) for spec in specs for k in spec.keys()))
    with torch.no_grad():
        penalty, grads = sharded_fd(specs, shard, coeffs, comm)
        done = set()
        for key, g in grads.items():
            p = lookup(key)
            if id(p) in done:  # keys naming one parameter share one gradient tensor
                continue
            done.add(id(p))
            buf = out.get(id(p))
            if buf is not None:
                local_part(buf).add_(g)
            elif is_dtensor(p):
                from torch.distributed.tensor import DTensor

                out[id(p)] = DTensor.from_local(
                    g,
                    p.device_mesh,
                    p.placements,
                    run_check=False,
                    shape=p.shape,
                    stride=torch.empty(p.shape, device="meta").stride(),
                )
            else:
                out[id(p)] = g
    return penalty, out


def model_sharded_fd(
    model: nn.Module, coeffs: Dict[str, float], comm: Optional[Comm] = None
) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
    """FD penalty of ``model`` (its parameters FSDP2 DTensors, sharded at the time of the call) and
    ``{id(p): lambda dFD/dp}`` (DTensors laid out as the parameters), from local shards and one all-reduce."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return accumulate_sharded_fd_grads(model_specs(model), params.__getitem__, coeffs, None, comm)


def check_sharded_forms(model: nn.Module, coeffs: Dict[str, float]) -> None:
    """Refuse, with :func:`sharded_fd`'s one-line error, a sharding of ``model`` (FSDP2 DTensors) that FD cannot run
    on (a shard boundary inside a head), before training starts: the same code on meta copies of the shards,
    nothing computed or sent."""
    held: Dict[int, Sharded] = {}
    params = dict(model.named_parameters(remove_duplicate=False))

    def shard(key: Any) -> Sharded:
        p = params[key]
        if id(p) not in held:
            s = as_sharded(p)
            held[id(p)] = Sharded(s.local.to("meta"), s.layout)
        return held[id(p)]

    sharded_fd(model_specs(model), shard, coeffs, DryRunComm())


def holds_dtensors(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (the model was sharded by FSDP2 ``fully_shard``)."""
    return any(is_dtensor(p) for p in model.parameters())


# ---------------------------------------------------------------- models


def _qualified(prefix: str, key: Hashable) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def model_specs(model: nn.Module) -> List[FormSpec]:
    """Every form of ``model`` (as :func:`~fnl_transformers.core.forms.iter_forms` finds them), its keys qualified
    to parameter names (``model.named_parameters(remove_duplicate=False)``); no parameter is read."""
    out = []
    for name, module in model.named_modules():
        for spec in module_forms(module):
            out.append(spec.with_keys(functools.partial(_qualified, name)))
    return out


Placement = Callable[[str, torch.Tensor], Optional[int]]


def fsdp_default(name: str, p: torch.Tensor) -> Optional[int]:
    """FSDP2's default placement: every parameter split along dim 0."""
    return 0


def qkv_along_inputs(*suffixes: str) -> Placement:
    """Dim 0, except parameters whose name ends with one of ``suffixes`` (e.g. the q/k/v projection weights),
    split along dim 1: then every factor is split along its contracted dimension."""

    def placement(name: str, p: torch.Tensor) -> Optional[int]:
        return 1 if name.endswith(tuple(suffixes)) else 0

    return placement


def shard_model(
    model: nn.Module, world_size: int, rank: int, placement: Placement = fsdp_default
) -> Dict[str, Sharded]:
    """``{name: Sharded}`` of every 2-D parameter of ``model``, chunked as FSDP2 would with ``placement``
    (``name, parameter -> dim or None``); the local tensors are views of the parameters (meta ones stay meta)."""
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.dim() == 2:
            layout = ShardLayout((p.shape[0], p.shape[1]), placement(name, p), rank, world_size)
            out[name] = Sharded(layout.take(p.detach()), layout)
    return out


def fd_comm_log(
    model: nn.Module, coeffs: Dict[str, float], world_size: int, placement: Placement = fsdp_default
) -> CommLog:
    """The collectives one process issues for one :func:`sharded_fd` call (one update) on ``model`` sharded over
    ``world_size`` processes with ``placement``: the code path of a real run on meta copies of the parameters
    with a :class:`DryRunComm` (nothing computed or sent). Every process issues the same calls."""
    shards = {
        name: Sharded(s.local.to("meta"), s.layout) for name, s in shard_model(model, world_size, 0, placement).items()
    }
    comm = DryRunComm()
    sharded_fd(model_specs(model), shards.__getitem__, coeffs, comm)
    return comm.log


class _Attention(nn.Module):
    """Projections in ``nn.Linear`` layout with the QK and OV forms registered (as fairseq's and BERT's)."""

    def __init__(self, d: int, heads: int, head_dim: int):
        from .forms import attention_form_specs, register_attention_forms

        super().__init__()
        inner = heads * head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, inner) for _ in range(3))
        self.out_proj = nn.Linear(inner, d)
        register_attention_forms(
            self, attention_form_specs("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", heads)
        )


def attention_stack(
    attentions: int, d: int, heads: int, head_dim: int, ffn: Sequence[Tuple[int, int, int]] = ()
) -> nn.Module:
    """A meta-device module with ``attentions`` attention layers (d, heads x head_dim) and factorized linear
    layers ``(in, out, rank)``: the forms of a Transformer, for :func:`fd_comm_log`."""
    from .layers import FactorizedLinear

    with torch.device("meta"):
        model = nn.Module()
        model.attn = nn.ModuleList(_Attention(d, heads, head_dim) for _ in range(attentions))
        model.ffn = nn.ModuleList(FactorizedLinear(i, o, rank=r) for i, o, r in ffn)
    return model


def bert_param_count(vocab=30522, d=768, layers=12, ffn=3072, positions=512, types=2) -> int:
    """Parameters of a BERT encoder with pooler (HF ``BertModel``): the size of its gradient all-reduce."""
    emb = (vocab + positions + types) * d + 2 * d
    layer = 4 * (d * d + d) + 2 * d + (d * ffn + ffn) + (ffn * d + d) + 2 * d
    return emb + layers * layer + d * d + d


def comm_table() -> List[dict]:
    """FD communication per update under sharding for BERT-base and the IWSLT'14 Transformer
    (``fnl_transformer_iwslt_de_en``: 6 + 6 layers, 18 attentions of 4 heads x 128, FFN 512 -> 1024)."""
    bert = attention_stack(12, 768, 12, 64)
    iwslt = attention_stack(18, 512, 4, 128)
    r = 128  # rank scale 0.25 of min(512, 1024)
    iwslt_lowrank = attention_stack(18, 512, 4, 128, ffn=[(512, 1024, r), (1024, 512, r)] * 12)
    qkv = qkv_along_inputs("q_proj.weight", "k_proj.weight", "v_proj.weight")
    attn = {"qk": 1.0, "ov": 1.0}
    rows = []
    for name, model, coeffs, world, placement, how in [
        ("BERT-base, QK + OV", bert, attn, 4, fsdp_default, "dim 0 (FSDP2 default), 4 processes"),
        ("BERT-base, QK + OV", bert, attn, 8, qkv, "q/k/v along dim 1, 8 processes"),
        ("IWSLT'14 Transformer, QK + OV", iwslt, attn, 4, fsdp_default, "dim 0 (FSDP2 default), 4 processes"),
        ("IWSLT'14 Transformer, QK + OV", iwslt, attn, 8, qkv, "q/k/v along dim 1, 8 processes"),
        (
            "IWSLT'14 Transformer, QK + OV + FFN at rank 128",
            iwslt_lowrank,
            {**attn, "linear": 1.0},
            4,
            fsdp_default,
            "dim 0 (FSDP2 default), 4 processes",
        ),
    ]:
        log = fd_comm_log(model, coeffs, world, placement)
        grad = 4 * bert_param_count() if name.startswith("BERT") else None
        rows.append(
            dict(model=name, sharding=how, calls=len(log.calls), numel=log.numel, bytes=log.bytes, gradient_bytes=grad)
        )
    return rows


def main() -> None:
    """``python -m fnl_transformers.core.sharded``: the table of :func:`comm_table` (markdown)."""
    print("| model | sharding | all-reduces | float32 numbers | bytes per update | of the gradient all-reduce |")
    print("|---|---|---|---|---|---|")
    for r in comm_table():
        share = "-" if r["gradient_bytes"] is None else f"{100 * r['bytes'] / r['gradient_bytes']:.2f}%"
        print(f"| {r['model']} | {r['sharding']} | {r['calls']} | {r['numel']:,} | {r['bytes']:,} | {share} |")
    print(
        f"\nBERT-base gradient all-reduce: {bert_param_count():,} float32 parameters = {4 * bert_param_count():,} bytes"
    )


if __name__ == "__main__":
    main()
