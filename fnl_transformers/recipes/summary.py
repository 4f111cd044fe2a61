"""Collect recipe results into a markdown table and a PNG plot (the paper's Figure 4 view).

``python -m fnl_transformers.recipes.summary RUNS... --out DIR`` takes results JSON files or directories
(searched recursively for ``*.results.json``, written by ``recipes/iwslt14/eval.sh`` and ``recipes/bert/*.sh``)
and writes ``DIR/summary.md`` (one table per metric: score, parameters, regularizer, coefficient, rank scale,
updates, path) and ``DIR/summary.png`` (per metric: score against parameter count, and score against the
regularization coefficient, one marker per variant; coefficient 0 sits on the linear part of a symlog axis).
BERT pretraining runs, with the SQuAD scores of their models, get the layout of the paper's Table 4 instead
(:mod:`fnl_transformers.recipes.bert_table`: a table and ``DIR/bert_mlm_curves.png``).
Runs of the Figure 4 sweep (folders with ``grid.json``) get both panels of the paper's Figure 4
(:mod:`fnl_transformers.recipes.figure4`: ``DIR/fig4_top.png``, ``DIR/fig4_bottom.png``, ``DIR/fig4.md``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import OrderedDict
from typing import Dict, List

LOWER_IS_BETTER = {"mlm_loss"}
METRIC_LABELS = {
    "bleu": "BLEU (sacrebleu, detokenized)",
    "f1": "SQuAD v1.1 F1",
    "exact_match": "SQuAD v1.1 EM",
    "mlm_loss": "MLM eval loss (lower is better)",
}


def find_results(paths: List[str]) -> List[str]:
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += sorted(glob.glob(os.path.join(path, "**", "*.results.json"), recursive=True))
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise FileNotFoundError(f"no such results file or directory: {path}")
    if not found:
        raise FileNotFoundError(f"no *.results.json under {', '.join(paths)}: run the recipes' eval steps first")
    return list(OrderedDict.fromkeys(os.path.abspath(p) for p in found))


def load(paths: List[str]) -> List[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        for key in ("metric", "score"):
            if key not in r:
                raise ValueError(f"{path} has no '{key}': not a recipe results file")
        r["_path"] = path
        r["_run"] = os.path.basename(os.path.dirname(path))
        rows.append(r)
    return rows


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown(rows: List[dict]) -> str:
    out = []
    for metric in sorted({r["metric"] for r in rows}):
        sign = 1 if metric in LOWER_IS_BETTER else -1  # best first
        sel = sorted((r for r in rows if r["metric"] == metric), key=lambda r: (sign * r["score"], r["_run"]))
        out.append(f"### {METRIC_LABELS.get(metric, metric)}\n")
        out.append(
            "| run | variant | " + metric + " | parameters | regularizer | coefficient | rank scale | head dim "
            "| updates |"
        )
        out.append("|---|---|---:|---:|---|---:|---:|---:|---:|")
        for r in sel:
            out.append(
                "| "
                + " | ".join(
                    [
                        r["_run"],
                        str(r.get("variant", "-")),
                        f"{r['score']:.2f}",
                        _fmt(r.get("params")),
                        str(r.get("regularizer", "-")),
                        f"{r['coef']:g}" if r.get("coef") else "0",
                        _fmt(r.get("rank_scale")),
                        _fmt(r.get("head_dim")),
                        _fmt(r.get("updates")),
                    ]
                )
                + " |"
            )
        sigs = sorted({r["sacrebleu_signature"] for r in sel if r.get("sacrebleu_signature")})
        for s in sigs:
            out.append(f"\nsacrebleu signature: `{s}`")
        out.append("")
    out.append("Results files:\n")
    out += [f"- {r['_run']}: `{r['_path']}`" for r in rows]
    return "\n".join(out) + "\n"


def plot(rows: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({r["metric"] for r in rows})
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 4.2 * len(metrics)), squeeze=False)
    markers = "osD^v<>PX*h"
    for i, metric in enumerate(metrics):
        sel = [r for r in rows if r["metric"] == metric]
        variants = list(OrderedDict.fromkeys(str(r.get("variant", r["_run"])) for r in sel))
        positive = [r["coef"] for r in sel if r.get("coef")]
        for j, v in enumerate(variants):
            vs = [r for r in sel if str(r.get("variant", r["_run"])) == v]
            m = markers[j % len(markers)]
            with_params = [r for r in vs if r.get("params")]
            if with_params:  # a sweep of one variant is one line, sorted along x
                pts = sorted((r["params"], r["score"]) for r in with_params)
                axes[i][0].plot(*zip(*pts), marker=m, markersize=7, linewidth=1, label=v)
            pts = sorted((r.get("coef") or 0.0, r["score"]) for r in vs)
            axes[i][1].plot(*zip(*pts), marker=m, markersize=7, linewidth=1, label=v)
        axes[i][0].set_xlabel("parameters")
        axes[i][1].set_xlabel("regularization coefficient (weight decay / Frobenius decay)")
        if positive:
            axes[i][1].set_xscale("symlog", linthresh=min(positive))
        for ax in axes[i]:
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[i][0].set_title(f"{metric} vs parameter count")
        axes[i][1].set_title(f"{metric} vs regularization coefficient")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def summarize(paths: List[str], out_dir: str) -> Dict[str, object]:
    """Write ``summary.md`` and the plots; returns ``{"table", "plots", "plot" (the first), "markdown"}``.

    Runs of the Figure 4 sweep go to its two panels (:mod:`fnl_transformers.recipes.figure4`); BERT pretraining
    results (recipe ``bert-mlm``) and the SQuAD results of their models go to the Table 4 layout
    (:mod:`fnl_transformers.recipes.bert_table`, plot ``bert_mlm_curves.png``); every other result to the tables
    by metric above (plot ``summary.png``)."""
    from . import bert_table, figure4

    rows = load(find_results(paths))
    grid, rows = figure4.split_rows(rows)
    bert, rest = bert_table.split_rows(rows)
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, "summary.md")
    sections, plots = [], []
    if rest:
        sections.append(markdown(rest))
        plots.append(os.path.join(out_dir, "summary.png"))
        plot(rest, plots[-1])
    if bert:
        sections.append(bert_table.markdown(bert))
        if bert_table.plot(bert, os.path.join(out_dir, bert_table.PLOT)):
            plots.append(os.path.join(out_dir, bert_table.PLOT))
    if grid:
        fig = figure4.write(grid, out_dir)
        sections.append(fig["markdown"])
        plots += fig["plots"]
    text = "\n".join(sections)
    with open(md_path + ".tmp", "w") as f:
        f.write(text)
    os.replace(md_path + ".tmp", md_path)
    return {"table": md_path, "plots": plots, "plot": plots[0] if plots else None, "markdown": text}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fnl_transformers.recipes.summary", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="results JSON files or directories holding them")
    p.add_argument("--out", required=True, help="directory for summary.md and summary.png")
    args = p.parse_args(argv)
    try:
        out = summarize(args.runs, args.out)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"{os.environ.get('FNL_PROG', 'summary')}: error: {exc}", file=sys.stderr)
        return 2
    print(out["markdown"])
    print(f"table: {out['table']}")
    for path in out["plots"]:
        print(f"plot:  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
