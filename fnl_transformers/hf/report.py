"""The per-layer table of a patched model (``fnl compress`` / ``fnl inspect``), read from its plan alone.

Rows: every shrunk attention form (``qk``, ``ov``: per-head dims, parameters of its two projections) and
every factorized layer (``linear``, ``embedding``: shape, rank, parameters), with the relative approximation
error ``||W - W_r||_F / ||W||_F`` measured when the model was patched with spectral initialization (for
attention forms: over all heads, QK forms including the query-bias column). ``-`` where it was not measured
(random initialization).
"""
from __future__ import annotations

import re
from typing import List

_KIND_ORDER = {"embedding": 0, "qk": 1, "ov": 2, "linear": 3}


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def table_rows(plan: dict) -> List[dict]:
    """Rows in natural module order (``layer.2`` before ``layer.10``), the same before and after saving."""
    rows = []
    for name, e in plan["attention"].items():
        if e["qk_head_dim"] == e["head_dim"] and e["ov_head_dim"] == e["head_dim"]:
            continue
        for form in ("qk", "ov"):
            params = e.get(f"{form}_params") or [None, None]
            rows.append({"layer": name, "kind": form, "shape": f"{e['heads']} heads x {e['head_dim']}",
                         "rank": e[f"{form}_head_dim"], "before": params[0], "after": params[1],
                         "error": e.get(f"{form}_rel_error")})
    for name, e in plan["layers"].items():
        if e["type"] == "tied_head":
            continue
        params = e.get("params") or [None, None]
        rows.append({"layer": name, "kind": e["kind"], "shape": f"{e['shape'][0]} x {e['shape'][1]}",
                     "rank": e["rank"], "before": params[0], "after": params[1], "error": e.get("rel_error")})
    return sorted(rows, key=lambda r: (_natural(r["layer"]), _KIND_ORDER[r["kind"]]))


def format_table(plan: dict) -> str:
    """The table as text, with a total line (whole-model parameters before and after)."""
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
    before, after = plan.get("params_before"), plan.get("params_after")
    if before and after:
        out.append(f"total parameters: {before:,} -> {after:,} ({after / before:.3f} of the original)")
    return "\n".join(out)
