"""The per-layer table of a patched model (``fnl compress`` / ``fnl inspect``), read from its plan alone.

Rows: every shrunk attention form (``qk``, ``ov``: per-head dims, parameters of its two projections) and
every factorized layer (``linear``, ``embedding``: shape, rank, parameters), with the relative approximation
error ``||W - W_r||_F / ||W||_F`` measured when the model was patched with spectral or activation-aware
initialization (for attention forms: over all heads, QK forms including the query-bias column), and, for
activation-aware truncation, the relative error of the layer's outputs on the calibration inputs. ``-`` where it
was not measured (random initialization; weight-only SI has no output error). The output-level fidelity to the
original model is the last line when it was measured (``fnl compress``).
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
            fit = getattr(e, f"{form}_fit") or {}
            rows.append(
                {
                    "layer": name,
                    "kind": form,
                    "shape": f"{e.heads} heads x {e.head_dim}",
                    "rank": getattr(e, f"head_dim_{form}"),
                    "before": params[0],
                    "after": params[1],
                    "error": getattr(e, f"{form}_rel_error"),
                    "output_error": fit.get("output_rel_error"),
                }
            )
    for name, layer in plan.layers.items():
        if layer.type == "tied_head":
            continue
        params = layer.params or [None, None]
        rows.append(
            {
                "layer": name,
                "kind": layer.kind,
                "shape": f"{layer.shape[0]} x {layer.shape[1]}",
                "rank": layer.rank,
                "before": params[0],
                "after": params[1],
                "error": layer.rel_error,
                "output_error": (layer.fit or {}).get("output_rel_error"),
            }
        )
    return sorted(rows, key=lambda r: (_natural(r["layer"]), _KIND_ORDER[r["kind"]]))


def format_table(plan: Union[Plan, dict]) -> str:
    """The table as text, with a total line (whole-model parameters before and after)."""
    plan = plan if isinstance(plan, Plan) else Plan.from_dict(plan)
    rows = table_rows(plan)
    calibrated = any(r["output_error"] is not None for r in rows)
    header = ("layer", "kind", "shape", "rank", "params", "rel. error") + (("output error",) if calibrated else ())
    show = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    lines = []
    for r in rows:
        params = "-" if r["before"] is None else f"{r['before']:,} -> {r['after']:,}"
        line = (r["layer"], r["kind"], r["shape"], str(r["rank"]), params, show(r["error"]))
        lines.append(line + ((show(r["output_error"]),) if calibrated else ()))
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    fmt = lambda row: "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    out = [fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in lines]
    if not lines:
        out.append("(no layer factorized and no head shrunk; attention forms registered for FD)")
    if calibrated:
        out.append(
            "rel. error: ||W - W'||_F / ||W||_F; output error: of the layer's outputs on the calibration "
            "inputs (activation-aware truncation)"
        )
    before, after = plan.params_before, plan.params_after
    if before and after:
        out.append(f"total parameters: {before:,} -> {after:,} ({after / before:.3f} of the original)")
    if plan.fidelity:
        from .fidelity import format_fidelity

        out.append(format_fidelity(plan.fidelity))
    return "\n".join(out)
