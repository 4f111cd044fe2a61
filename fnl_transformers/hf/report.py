"""The per-layer table of a patched model (``fnl compress`` / ``fnl inspect``), read from its plan alone.

Rows: every shrunk attention form (``qk``, ``ov``: per-head dims, parameters of its two projections) and
every factorized layer (``linear``, ``embedding``: shape, rank, parameters), with the relative approximation
error ``||W - W_r||_F / ||W||_F`` measured when the model was patched with spectral initialization (for
attention forms: over all heads, QK forms including the query-bias column). ``-`` where it was not measured
(random initialization).
"""
from __future__ import annotations

import re
from typing import List, Union

from .plan import Plan

_KIND_ORDER = {"embedding": 0, "qk": 1, "ov": 2, "linear": 3}


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def table_rows(plan: Union[Plan, dict]) -> List[dict]:
    """Rows in natural module order (``layer.2`` before ``layer.10``), the same before and after saving."""
    plan = plan if isinstance(plan, Plan) else Plan.from_dict(plan)
    rows = []
    for name, e in plan.attention.items():
        if not e.dims.changed:
            continue
        for form in ("qk", "ov"):
            params = getattr(e, f"{form}_params") or [None, None]
            rows.append({"layer": name, "kind": form, "shape": f"{e.heads} heads x {e.head_dim}",
                         "rank": getattr(e, f"head_dim_{form}"), "before": params[0], "after": params[1],
                         "error": getattr(e, f"{form}_rel_error")})
    for name, layer in plan.layers.items():
        if layer.type == "tied_head":
            continue
        params = layer.params or [None, None]
        rows.append({"layer": name, "kind": layer.kind, "shape": f"{layer.shape[0]} x {layer.shape[1]}",
                     "rank": layer.rank, "before": params[0], "after": params[1], "error": layer.rel_error})
    return sorted(rows, key=lambda r: (_natural(r["layer"]), _KIND_ORDER[r["kind"]]))


def format_table(plan: Union[Plan, dict]) -> str:
    """The table as text, with a total line (whole-model parameters before and after)."""
    plan = plan if isinstance(plan, Plan) else Plan.from_dict(plan)
    header = ("layer", "kind", "shape", "rank", "params", "rel. error")
    lines = []
    for r in table_rows(plan):
        params = "-" if r["before"] is None else f"{r['before']:,} -> {r['after']:,}"
        error = "-" if r["error"] is None else f"{r['error']:.4f}"
        lines.append((r["layer"], r["kind"], r["shape"], str(r["rank"]), params, error))
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    fmt = lambda row: "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    out = [fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in lines]
    if not lines:
        out.append("(no layer factorized and no head shrunk; attention forms registered for FD)")
    before, after = plan.params_before, plan.params_after
    if before and after:
        out.append(f"total parameters: {before:,} -> {after:,} ({after / before:.3f} of the original)")
    return "\n".join(out)
