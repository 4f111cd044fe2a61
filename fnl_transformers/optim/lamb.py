"""LAMB (You et al., 2020) and FLAMBe: LAMB with decoupled Frobenius decay (Khodak et al., ICLR 2021, Sec. 6
and Table 4).

Update for each parameter tensor ``w`` with gradient ``g`` at step ``t`` (NVIDIA's BERT recipe, "NVLAMB"):

* optional global pre-normalization: ``g <- g / max(1, ||G||_2 / max_grad_norm)``, ``G`` all gradients of
  the optimizer together (apex ``FusedLAMB``'s ``max_grad_norm``);
* ``m = beta1 m + (1 - beta1) g``, ``v = beta2 v + (1 - beta2) g^2``;
* ``m_hat = m / (1 - beta1^t)``, ``v_hat = v / (1 - beta2^t)`` (``bias_correction=False``: no division);
* ``r = m_hat / (sqrt(v_hat) + eps) + d`` where the decay term ``d`` is ``weight_decay * w`` (LAMB) or, in
  FLAMBe, for factors of a factorized form, ``lambda_kind * dFD/dw`` with ``FD = 1/2 ||W_form||_F^2``
  (paper Definition 3.2; for ``U`` in ``W = U V^T`` that is ``U (V^T V)``);
* trust ratio ``q = ||w|| / ||r||``, **and q = 1 when either norm is 0** (a zero-initialized tensor, or a zero
  update); with ``trust_clip``, ``q = min(q, trust_clip)``;
* ``w <- w - lr * q * r``.

Differences from other LAMBs, on purpose:

* The trust ratio is applied to every tensor, including those without decay (biases, LayerNorm): apex
  ``FusedLAMB`` skips it for groups with ``weight_decay == 0`` unless ``use_nvlamb=True``; torch-optimizer's
  ``Lamb`` always applies it (but clamps ``||w||`` to ``clamp_value`` = 10 by default; no clamp here).
* Decay is decoupled (added to the update inside the trust ratio, AdamW style), never added to the gradient.
* ``step`` counts per parameter (a tensor without gradient does not advance), as in torch-optimizer.

FSDP2 parameters (DTensors, ``fully_shard``) are updated on their local shards; the norms of the trust ratios
and of ``max_grad_norm`` are completed by one all-reduce per batch of tensors, and FLAMBe's FD comes from the
shards (:mod:`fnl_transformers.core.sharded`, one all-reduce of k x k pieces).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..core.sharded import is_dtensor, local_part, mesh_group
from ._fd import GroupForms, check_number, group_forms
from .base import FDOptimizer, working_copy, write_back

# Tensors up to this many elements are updated together with torch._foreach_* ops (one call per operation for
# all of them); larger ones one at a time, their update direction in a reusable workspace (no allocation).
FOREACH_MAX_ELEMENTS = 1 << 16


def lamb_update(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    steps: List[int],
    fd: Optional[GroupForms] = None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    trust_clip: Optional[float],
    grad_scale: Optional[torch.Tensor] = None,
    workspace: Optional[Dict] = None,
) -> None:
    """One LAMB/FLAMBe step on lists of tensors (in place). For the factors of ``fd``'s forms the decay term is
    ``lambda_kind * dFD/dw`` (from the weights before the step) instead of ``weight_decay * w``.

    ``workspace``: a dict the caller keeps between steps; large tensors' update directions are computed in a
    buffer kept there instead of fresh memory each step (which costs page faults on every step)."""
    hyper = dict(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        bias_correction=bias_correction,
        trust_clip=trust_clip,
        scale=None if grad_scale is None else float(grad_scale),
    )
    if hyper["scale"] == 1.0:
        hyper["scale"] = None
    fd_ids = fd.param_ids() if fd is not None else set()
    work = [working_copy(w) for w in params]  # float32 copies of half-precision parameters (see optim.base)
    small: List[int] = []
    large: List[int] = []
    factors: List[int] = []
    for i, w in enumerate(params):  # by the whole tensor's size: every process batches alike
        (factors if id(w) in fd_ids else small if w.numel() <= FOREACH_MAX_ELEMENTS else large).append(i)
    # FSDP2 parameters (DTensors): the update runs on the local shards; norms are completed by an all-reduce
    sharded = [is_dtensor(w) for w in params]
    hyper["group"] = mesh_group(params) if any(sharded) else None
    local = [local_part(w) for w in work]
    tensors = (
        local,
        [local_part(g) for g in grads],
        [local_part(m) for m in exp_avgs],
        [local_part(v) for v in exp_avg_sqs],
        steps,
        [id(w) for w in params],
        sharded,
    )
    if small:  # together: one foreach call per operation, directions in fresh (small) tensors
        _lamb_batch([[t[i] for i in small] for t in tensors], None, weight_decay, None, **hyper)
    for i, r in zip(large, _buffers(workspace, "large", [local[i] for i in large], one_at_a_time=True)):
        _lamb_batch([[t[i]] for t in tensors], [r], weight_decay, None, **hyper)  # one at a time, in the workspace
    if factors:  # FLAMBe: r += lambda dFD/dw (paper Sec. 6, Table 4) where LAMB puts weight decay
        rs = _buffers(workspace, "factors", [local[i] for i in factors])
        _lamb_batch([[t[i] for i in factors] for t in tensors], rs, 0.0, fd, **hyper)
    for w, w32 in zip(params, work):
        write_back(w, w32)


def _buffers(workspace: Optional[Dict], name: str, like: List[torch.Tensor], one_at_a_time: bool = False):
    """Contiguous buffers shaped like ``like``, views of one flat tensor kept in ``workspace`` between steps (grown
    as needed; fresh memory every step costs page faults). ``one_at_a_time``: the buffers all share the memory
    of the largest (each is used before the next one)."""
    if not like:
        return []
    if any(w.dtype != like[0].dtype or w.device != like[0].device for w in like):  # mixed: plain tensors
        return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in like]
    sizes = [w.numel() for w in like]
    total = max(sizes) if one_at_a_time else sum(sizes)
    key = (name, like[0].dtype, like[0].device)
    flat = None if workspace is None else workspace.get(key)
    if flat is None or flat.numel() < total:
        flat = torch.empty(total, dtype=like[0].dtype, device=like[0].device)
        if workspace is not None:
            workspace[key] = flat
    out, offset = [], 0
    for w, n in zip(like, sizes):
        out.append(flat[offset : offset + n].view(w.shape))
        offset += 0 if one_at_a_time else n
    return out


def _lamb_batch(
    tensors,
    rs: Optional[List[torch.Tensor]],
    weight_decay: float,
    fd: Optional[GroupForms],
    *,
    lr,
    beta1,
    beta2,
    eps,
    bias_correction,
    trust_clip,
    scale,
    group=None,
) -> None:
    """LAMB on a list of tensors, the update directions in ``rs`` (or fresh tensors when None). Every element
    goes through the same operations whether the list holds one tensor or many (``torch._foreach_*``), so a
    tensor's result does not depend on its batch. Tensors flagged sharded are local shards of DTensors: their
    norms are summed over ``group``'s processes."""
    ws, gs, ms, vs, ts, ids, sharded = tensors
    gs = [g.to(m.dtype) for g, m in zip(gs, ms)]  # float32 gradients for half-precision parameters
    if scale is not None:  # global pre-normalization g / scale, held in r until the moments are updated
        if rs is None:
            gs = torch._foreach_div(gs, scale)
        else:
            for g, r in zip(gs, rs):
                torch.div(g, scale, out=r)
            gs = rs
    torch._foreach_lerp_(ms, gs, 1 - beta1)  # m = beta1 m + (1 - beta1) g
    torch._foreach_mul_(vs, beta2)  # v = beta2 v + (1 - beta2) g^2
    torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
    # r = m_hat / (sqrt(v_hat) + eps) = m / (sqrt(c^2 v) + e) with c = (1 - beta1^t) / sqrt(1 - beta2^t) and
    # e = (1 - beta1^t) eps (c = 1, e = eps without bias correction): four passes, no temporaries
    if bias_correction:
        bc1 = [1 - beta1**t for t in ts]
        c2 = [b * b / (1 - beta2**t) for b, t in zip(bc1, ts)]
        e = [b * eps for b in bc1]
    else:
        c2, e = [1.0] * len(ts), [eps] * len(ts)
    if rs is None:
        r_list = list(torch._foreach_mul(vs, c2))
    else:
        r_list = rs
        for v, c, r in zip(vs, c2, r_list):
            torch.mul(v, c, out=r)
    torch._foreach_sqrt_(r_list)
    torch._foreach_add_(r_list, e)
    for m, r in zip(ms, r_list):
        torch.div(m, r, out=r)
    if fd is not None:
        fd.add_to(dict(zip(ids, r_list)))  # + lambda dFD/dw, added inside the Gram products
    elif weight_decay != 0:
        torch._foreach_add_(r_list, ws, alpha=weight_decay)  # LAMB: + wd * w
    _trust_steps(ws, r_list, lr, trust_clip, sharded, group)


def tensor_norms(
    ts: List[torch.Tensor], sharded: Optional[List[bool]] = None, group=None, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """The 2-norm of each tensor; for those flagged ``sharded`` (local shards of one tensor each), of the whole
    tensor: squared local norms summed over ``group`` by one all-reduce."""
    norms = torch.stack(torch._foreach_norm(ts, 2, dtype=dtype) if dtype is not None else torch._foreach_norm(ts))
    if sharded is None or not any(sharded):
        return norms
    import torch.distributed as dist

    mask = torch.tensor(sharded, device=norms.device)
    sq = torch.where(mask, norms.square(), torch.zeros_like(norms))
    dist.all_reduce(sq, group=group)
    return torch.where(mask, sq.sqrt(), norms)


def _trust_steps(
    ws: List[torch.Tensor],
    rs: List[torch.Tensor],
    lr: float,
    trust_clip: Optional[float],
    sharded: Optional[List[bool]] = None,
    group=None,
) -> None:
    """``w -= lr * q * r`` with the trust ratio ``q = ||w|| / ||r||`` (1 if a norm is 0), ``min(q, trust_clip)``;
    all ratios in one vector operation, no host synchronization (one all-reduce of the norms for shards)."""
    both = tensor_norms(list(ws) + list(rs), None if sharded is None else list(sharded) * 2, group)
    w_norm, r_norm = both[: len(ws)], both[len(ws) :]
    trust = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, torch.ones_like(w_norm))
    if trust_clip is not None:
        trust = trust.clamp(max=trust_clip)
    torch._foreach_addcmul_(ws, rs, list(trust.unbind()), value=-lr)


class Lamb(FDOptimizer):
    """LAMB with bias correction, decoupled weight decay and per-tensor trust ratio (see module docstring).

    Args:
        params: parameters or groups (``fnl_transformers.optim.param_groups(model, weight_decay=...)`` keeps
            biases and LayerNorm out of decay).
        lr: learning rate (default ``1e-3``).
        betas: ``(beta1, beta2)``, each in ``[0, 1)`` (default ``(0.9, 0.999)``).
        eps: added to ``sqrt(v_hat)`` (default ``1e-6``).
        weight_decay: decoupled decay ``wd * w`` inside the trust ratio (default ``0.01``).
        bias_correction: divide the moments by ``1 - beta^t`` (default ``True``).
        trust_clip: upper bound on the trust ratio, or ``None`` (default) for none.
        max_grad_norm: global gradient-norm pre-normalization threshold (NVIDIA uses ``1.0``), or ``None``
            (default) to use gradients as they are.

    Memory: besides the two moments per parameter, a scratch buffer the size of the largest parameter (update
    directions of large tensors, reused every step; FLAMBe adds one for its FD factors), not saved in the
    ``state_dict``.
    """

    supports_fd = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        trust_clip: Optional[float] = None,
        max_grad_norm: Optional[float] = None,
    ):
        if max_grad_norm is not None:
            check_number("max_grad_norm", max_grad_norm, low_open=True, fix=" (None disables pre-normalization)")
        self.max_grad_norm = max_grad_norm
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            trust_clip=trust_clip,
        )
        super().__init__(params, defaults)

    def check_group(self, group: dict, index: int) -> None:
        if group["trust_clip"] is not None:
            check_number(
                f"param group {index}: trust_clip", group["trust_clip"], low_open=True, fix=" (None disables clipping)"
            )
        if not isinstance(group["bias_correction"], bool):
            raise ValueError(
                f"param group {index}: bias_correction must be True or False, got {group['bias_correction']!r}"
            )

    def _grad_scale(self) -> Optional[torch.Tensor]:
        """``max(1, ||G|| / max_grad_norm)`` over every gradient of the optimizer, or None."""
        if self.max_grad_norm is None:
            return None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32  # >= float32
        sharded = [is_dtensor(g) for g in grads]  # FSDP2: local shards, norms summed over the processes
        norms = tensor_norms([local_part(g) for g in grads], sharded, mesh_group(grads), dtype)
        total = torch.linalg.vector_norm(norms)
        return torch.clamp(total / self.max_grad_norm, min=1.0)

    def _workspace(self) -> Dict:
        """Scratch memory reused across steps (not part of the optimizer's state or its ``state_dict``)."""
        ws = self.__dict__.get("_lamb_workspace")
        if ws is None:
            ws = self.__dict__["_lamb_workspace"] = {}
        return ws

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = self._grad_scale()
        for group in self.param_groups:
            fd = group_forms(group) if self.supports_fd else None
            params, grads, exp_avgs, exp_avg_sqs, steps = self._gather(group)
            beta1, beta2 = group["betas"]
            lamb_update(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                fd,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                bias_correction=group["bias_correction"],
                trust_clip=group["trust_clip"],
                grad_scale=grad_scale,
                workspace=self._workspace(),
            )
        return loss


class FLAMBe(Lamb):
    """FLAMBe (paper Sec. 6 and Table 4): :class:`Lamb` whose decay term, for factors of factorized forms, is decoupled
    Frobenius decay ``lambda_kind * dFD/dw`` instead of ``weight_decay * w``.

    Forms and coefficients come from the parameter groups (``group["fd_forms"]``, ``group["fd"]``), which
    :func:`fnl_transformers.optim.param_groups` builds::

        FLAMBe(param_groups(model, fd_ov=1e-2, weight_decay=0.01), lr=1e-3)  # the paper's BERT setting

    Parameters outside forms keep regular decay; a group with active FD must have ``weight_decay=0``.
    With all FD coefficients 0 it is exactly :class:`Lamb`. Same arguments as :class:`Lamb`.
    """

    supports_fd = True
