"""BERT results in the layout of the paper's Table 4 (Sec. 6), for ``python -m fnl_transformers.recipes.summary``.

Input: the results JSONs of ``recipes/bert/pretrain.sh`` (recipe ``bert-mlm``) and of ``recipes/bert/squad.sh``
runs fine-tuned from those pretrained models (recipe ``squad``, matched by model directory). A phase-2 run
continues the phase-1 run it resumed: together they are one pretraining run, scored by its last phase.

Output: one row per optimizer x head dimension (and, when the runs differ in them, objective, phases and
coefficients): parameters, final held-out MLM loss, SQuAD v1.1 EM and F1; the mean over seeds, ``± s`` the
sample standard deviation where there are several; and a PNG of the held-out MLM loss curves
(``loss_curve.json`` of each run, averaged over seeds at common updates).
"""

from __future__ import annotations

import json
import os
import statistics
from collections import OrderedDict
from typing import Dict, List, Tuple

PRETRAIN = "bert-mlm"
OPTIMIZER_ORDER = ("lamb", "lamb-fd", "flambe")
OPTIMIZER_NAMES = {"lamb": "LAMB", "lamb-fd": "LAMB + FD in the loss", "flambe": "FLAMBe"}
PLOT = "bert_mlm_curves.png"


def _real(path) -> str:
    return os.path.realpath(path) if path else ""


def split_rows(rows: List[dict]) -> Tuple[List[dict], List[dict]]:
    """``(bert, other)``: pretraining results and the SQuAD results of their models, and everything else."""
    models = {_real(r.get("model_dir")) for r in rows if r.get("recipe") == PRETRAIN}
    bert = [
        r
        for r in rows
        if r.get("recipe") == PRETRAIN
        or (r.get("recipe") == "squad" and r.get("model_dir") and _real(r["model_dir"]) in models)
    ]
    ids = {id(r) for r in bert}
    return bert, [r for r in rows if id(r) not in ids]


def chains(pretrain: List[dict]) -> List[List[dict]]:
    """Pretraining runs as phase chains (phase 1 first), one per last phase."""
    by_out = {_real(r.get("out")): r for r in pretrain}
    resumed = {_real(r.get("resumed_from")) for r in pretrain if r.get("resumed_from")}
    out = []
    for r in pretrain:
        if _real(r.get("out")) in resumed:
            continue  # continued by a later phase
        chain = [r]
        while chain[0].get("resumed_from") and _real(chain[0]["resumed_from"]) in by_out:
            chain.insert(0, by_out[_real(chain[0]["resumed_from"])])
        out.append(chain)
    return out


def _head_key(label: str):
    return (0, 0) if label == "full" else (1, 0) if label == "half" else (2, -int(label))


def _setting(chain: List[dict]) -> tuple:
    last = chain[-1]
    return (
        last["optimizer"],
        str(last.get("head_dim_label", last.get("head_dim"))),
        last.get("objective", "mlm"),
        tuple(r.get("phase", 1) for r in chain),
        last.get("coef"),
        last.get("weight_decay"),
    )


def _sort_key(setting: tuple):
    opt, head, objective, phases, coef, wd = setting
    order = OPTIMIZER_ORDER.index(opt) if opt in OPTIMIZER_ORDER else len(OPTIMIZER_ORDER)
    return (order, _head_key(head), objective, phases, coef or 0.0, wd or 0.0)


def _g(value) -> str:
    return "-" if value is None else f"{value:g}"


def _stat(values: List[float], digits: int) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def groups(rows: List[dict]) -> "OrderedDict[tuple, dict]":
    """``{setting: {"chains": [...], "squad": [...]}}`` in table order (see the module docstring)."""
    pretrain = [r for r in rows if r.get("recipe") == PRETRAIN]
    squad_by_model: Dict[str, List[dict]] = {}
    for r in rows:
        if r.get("recipe") == "squad":
            squad_by_model.setdefault(_real(r.get("model_dir")), []).append(r)
    found: Dict[tuple, dict] = {}
    for chain in chains(pretrain):
        g = found.setdefault(_setting(chain), {"chains": [], "squad": []})
        g["chains"].append(chain)
        g["squad"] += squad_by_model.get(_real(chain[-1].get("model_dir")), [])
    return OrderedDict(sorted(found.items(), key=lambda kv: _sort_key(kv[0])))


def markdown(rows: List[dict]) -> str:
    out = [
        "### BERT pretraining and SQuAD v1.1 (the layout of the paper's Table 4)\n",
        "| optimizer | head dim | objective | phases | coefficient | seeds | parameters | MLM loss | SQuAD EM "
        "| SQuAD F1 |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for (opt, head, objective, phases, coef, wd), g in groups(rows).items():
        lasts = [c[-1] for c in g["chains"]]
        dims = sorted({r.get("head_dim") for r in lasts})
        params = sorted({r.get("params") for r in lasts if r.get("params")})
        coef_text = f"wd {_g(wd)}" if opt == "lamb" else f"FD {_g(coef)}, wd {_g(wd)}"
        out.append(
            "| "
            + " | ".join(
                [
                    OPTIMIZER_NAMES.get(opt, opt),
                    f"{head} ({', '.join(map(str, dims))})",
                    objective,
                    "+".join(map(str, phases)),
                    coef_text,
                    str(len(lasts)),
                    ", ".join(f"{p:,}" for p in params) or "-",
                    _stat([r["mlm_loss"] for r in lasts], 3),
                    _stat([r["exact_match"] for r in g["squad"]], 2),
                    _stat([r["f1"] for r in g["squad"]], 2),
                ]
            )
            + " |"
        )
    out += [
        "",
        "MLM loss: held-out masked-LM cross-entropy (nats per masked token, fixed masking) after the last "
        "phase; parameters: the pretraining model; mean over seeds, ± the sample standard deviation where "
        "there are several (SQuAD: over every fine-tuning run of those models).",
        "",
        "Results files:",
        "",
    ]
    for g in groups(rows).values():
        for chain in g["chains"]:
            out += [
                f"- {r['optimizer']}, head dim {r.get('head_dim_label', '-')}, seed {r.get('seed', '-')}, phase "
                f"{r.get('phase', 1)}: `{r['_path']}`"
                for r in chain
            ]
        out += [f"- SQuAD of `{r['model_dir']}`: `{r['_path']}`" for r in g["squad"]]
    return "\n".join(out) + "\n"


def _curve(chain: List[dict]) -> Tuple[Dict[int, float], List[int]]:
    """Held-out MLM loss by global update over a chain's phases, and the updates where later phases start."""
    points: Dict[int, float] = {}
    starts = []
    for r in chain:
        path = r.get("loss_curve")
        if not path or not os.path.isfile(path):
            return {}, []
        with open(path) as f:
            data = json.load(f)
        if r is not chain[0]:
            starts.append(data.get("phase_start", 0))
        for p in data["eval"]:
            points[p["update"]] = p["mlm_loss"]  # a phase's first point replaces the previous phase's last
    return points, starts


def plot(rows: List[dict], path: str) -> bool:
    """The held-out MLM loss curves (one line per table row; False when no run has a curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = False
    starts_all = set()
    for (opt, head, objective, _phases, coef, _wd), g in groups(rows).items():
        curves = [c for c in (_curve(ch) for ch in g["chains"]) if c[0]]
        if not curves:
            continue
        common = sorted(set.intersection(*(set(c[0]) for c in curves)))
        ys = [statistics.fmean(c[0][u] for c in curves) for u in common]
        for c in curves:
            starts_all.update(c[1])
        label = f"{OPTIMIZER_NAMES.get(opt, opt)}, {head} heads ({objective}, coef {_g(coef)})"
        ax.plot(
            common,
            ys,
            marker="o",
            markersize=3,
            linewidth=1.2,
            linestyle="-" if head == "full" else "--",
            label=label + (f", {len(curves)} seeds" if len(curves) > 1 else ""),
        )
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    for s in sorted(starts_all):
        ax.axvline(s, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("update (phase 2 continues phase 1's count; dotted: phase 2 starts)")
    ax.set_ylabel("held-out MLM loss")
    ax.set_title("BERT pretraining: held-out masked-LM loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True
