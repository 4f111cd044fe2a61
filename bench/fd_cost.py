"""Item 1. FD cost: penalty plus gradient from Gram matrices (the core) vs forming every product densely.

Attention layers (QK and OV forms of every head, head dim 64) at d = 512 and 1024, and a 1024 x 1024
``FactorizedLinear`` at rank scales 0.25, 0.5, 1 and 2. Two ways to use FD, each against the same dense
baseline (``W_h = A_h B_h^T`` formed per head, ``1/2 sum ||W_h||^2``, autograd backward):

* coupled: ``frobenius_penalty(model, ...)`` plus ``.backward()`` (what a loss term does);
* decoupled: ``accumulate_fd_grads`` (what FLAMBe/AdamWFD call each step; no autograd).

Where a form's rank exceeds ``m n / (m + n)`` the core itself forms the product (it is cheaper), so the
ratio there is about 1 by design. Target: at least 10x at d = 1024, head dim 64 (coupled).
"""

from __future__ import annotations

import torch
from torch import nn

from fnl_transformers.core import (
    FactorizedLinear,
    accumulate_fd_grads,
    attention_form_specs,
    frobenius_penalty,
    iter_forms,
    register_attention_forms,
)
from fnl_transformers.core.forms import module_lookup

from .common import check_close, main, median_times, row

ITEM, QUESTION = 1, "FD cost: Gram matrices vs dense products"


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        register_attention_forms(self, attention_form_specs("q.weight", "k.weight", "v.weight", "o.weight", heads))


def dense_penalty(model: nn.Module) -> torch.Tensor:
    """The naive way: form every product ``W_h = A_h [M] B_h^T`` densely, ``1/2 sum_h ||W_h||_F^2``."""
    total = 0.0
    for _, _, _, f in iter_forms(model):
        A = f.A if f.M is None else f.A @ f.M
        W = A @ f.B.repeat_interleave(A.shape[0] // f.B.shape[0], 0).transpose(1, 2)
        total = total + 0.5 * W.pow(2).sum()
    return total


def measure(model: nn.Module, kind: str, repeats: int):
    coeffs = {kind: 1.0} if kind != "attention" else {"qk": 1.0, "ov": 1.0}
    params = list(model.parameters())

    def zero():
        for p in params:
            p.grad = None

    def ours():
        zero()
        frobenius_penalty(model, **coeffs).backward()

    def naive():
        zero()
        dense_penalty(model).backward()

    specs = [(spec, module_lookup(mod)) for _, mod, spec, _ in iter_forms(model)]

    params_of = {}
    for spec, get in specs:  # the model's forms keyed by (module, path), as an optimizer group keys them by index
        for key in spec.keys():
            params_of[(id(get), key)] = get(key)
    keyed = [spec.with_keys(lambda key, get=get: (id(get), key)) for spec, get in specs]

    def decoupled():
        return accumulate_fd_grads(keyed, params_of.__getitem__, {k: 1.0 for k in ("linear", "qk", "ov")})

    # same numbers first: penalty and gradients of both routes agree
    ours()
    g_ours = [p.grad.clone() for p in params]
    naive()
    g_naive = [p.grad.clone() for p in params]
    err = max(check_close(a, b) for a, b in zip(g_ours, g_naive))
    by_id = decoupled()
    err = max(err, max(check_close(by_id[id(p)], g) for p, g in zip(params, g_naive) if id(p) in by_id))
    if err > 1e-3:
        raise AssertionError(f"Gram and dense FD gradients differ: relative error {err:.2e}")
    t = median_times({"naive": naive, "ours": ours, "decoupled": decoupled}, repeats)
    zero()
    return t, err


def run(quick: bool):
    repeats = 2 if quick else 5
    torch.manual_seed(0)
    rows = []
    head_dim = 16 if quick else 64
    for d in (64,) if quick else (512, 1024):
        heads = d // head_dim
        t, err = measure(Attention(d, heads), "attention", repeats)
        target = ">= 10x" if d == 1024 else "report"
        for name, key in (("coupled (penalty + backward)", "ours"), ("decoupled (accumulate_fd_grads)", "decoupled")):
            ratio = t["naive"] / t[key]
            met = (ratio >= 10) if (d == 1024 and key == "ours") else None
            rows.append(
                row(
                    f"attention d={d}, {heads} heads x {head_dim}, QK+OV, {name}",
                    "dense products",
                    t["naive"],
                    "Gram",
                    t[key],
                    ratio,
                    "baseline / ours (speed-up)",
                    target if key == "ours" else "report",
                    met,
                    grad_rel_err=err,
                )
            )
    d = 64 if quick else 1024
    for scale in (0.25, 0.5, 1.0, 2.0):
        rank = int(round(scale * d))
        layer = FactorizedLinear(d, d, rank, bias=False)
        t, err = measure(layer, "linear", repeats)
        route = "dense (cheaper)" if rank * 2 * d > d * d else "Gram"
        rows.append(
            row(
                f"linear {d}x{d}, rank scale {scale} (rank {rank}), coupled",
                "dense product",
                t["naive"],
                f"core ({route})",
                t["ours"],
                t["naive"] / t["ours"],
                "baseline / ours (speed-up)",
                "report",
                None,
                grad_rel_err=err,
            )
        )
    return rows


if __name__ == "__main__":
    main(ITEM, QUESTION, run)
