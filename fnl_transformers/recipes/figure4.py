"""The paper's Figure 4 (Khodak et al., ICLR 2021, Sec. 6): its grid of IWSLT'14 runs, and both panels drawn from
their results.

The grid is the official code's (``make.py``, ``transformer_settings`` and ``trials=3``), restricted to the lines
Figure 4 draws:

* **top** (the dense model, rank scale 0): test BLEU against the regularization coefficient for weight decay
  (``wd``), FD on the OV forms (``fd-ov``) and FD on the QK and OV forms (``fd-qkov``), coefficients
  :data:`DENSE_COEFS`; the dense unregularized model (``baseline``) is their coefficient-0 point and a
  horizontal line;
* **bottom** (rank scales :data:`SCALES`): test BLEU against the rank scale for weight decay and FD, each with
  and without SI (``wd``, ``wd+si``, ``fd``, ``fd+si``), the coefficient of each point chosen among
  :data:`COMPRESSED_COEFS` by validation BLEU (mean over seeds), never by test BLEU;
* seeds :data:`SEEDS`; a coefficient of 0 is one run shared by every line it belongs to (weight decay 0 and FD
  0 train the same model).

Each grid line and its ``make.py`` configuration (``<name>`` of ``$RESULTS/.../$SCALE/<name>/$DECAY/$TRIAL``):

* top ``baseline``: ``train.sh baseline``; ``reglr`` at decay 0;
* top ``wd``: ``wd --coef C``; ``reglr`` (``--weight-decay C``);
* top ``fd-ov``: ``fd-ov --coef C``; ``frob_ov`` (``--wd2fd-outval --frobenius-decay C``);
* top ``fd-qkov``: ``fd-qkov --coef C``; ``frob_qk_ov`` (``--wd2fd-quekey --wd2fd-outval``);
* bottom ``wd``: ``wd --coef C --rank-scale R --no-si``; ``reglr`` at ``--rank-scale R``;
* bottom ``wd+si``: ``wd --coef C --rank-scale R --si``; ``spectral_lin_qk_ov``;
* bottom ``fd``: ``fd-qkov --coef C --rank-scale R --no-si``; ``frob_lin_qk_ov``;
* bottom ``fd+si``: ``fd-qkov --coef C --rank-scale R --si``; ``spectral_lin_qk_ov+frob_lin_qk_ov``;
* coefficient 0 at rank scale R: ``baseline --rank-scale R --si`` / ``--no-si``; ``spectral_lin_qk_ov`` /
  ``reglr`` at decay 0.

At a rank scale the official code applies FD to every factorized layer (FFN, token and positional embeddings,
output projection) whenever ``--frobenius-decay`` is nonzero, with or without ``--wd2fd`` (its
``singleprocess_train.py`` resets the skip list), so its ``frob_qk_ov`` and ``frob_lin_qk_ov`` runs at R > 0 are
the same training; ``train.sh``'s FD variants at ``--rank-scale`` do the same (``--fd-linear C``). ``--si`` is
``--spectral --spectral-quekey --spectral-outval`` (``make.py`` ties ``spectral_qk`` to ``spectral_ov``).

``python -m fnl_transformers.recipes.figure4 RUNS... --out DIR`` (or ``summary``, which hands these runs here)
writes ``DIR/fig4_top.png``, ``DIR/fig4_bottom.png`` and ``DIR/fig4.md``. A run belongs to the grid when its
folder holds ``grid.json`` (written by the sweep, :mod:`fnl_transformers.recipes.sweep`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

DENSE_COEFS = (0.0, 1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3)  # make.py: rank scale 0
COMPRESSED_COEFS = (0.0, 1e-6, 5e-6, 1e-5, 5e-5, 1e-4)  # make.py: rank scales 0.25 and 0.5
SCALES = (0.25, 0.5)
SEEDS = (1, 2, 3)  # make.py: trials=3, --seed $TRIAL
TOP_LINES = ("wd", "fd-ov", "fd-qkov")
BOTTOM_LINES = ("wd", "wd+si", "fd", "fd+si")
LINES = ("baseline", "wd", "fd-ov", "fd-qkov", "fd", "wd+si", "fd+si")
LABELS = {
    "baseline": "dense, unregularized",
    "wd": "weight decay",
    "fd-ov": "FD on OV",
    "fd-qkov": "FD on QK + OV",
    "fd": "FD",
    "wd+si": "weight decay + SI",
    "fd+si": "FD + SI",
}
OFFICIAL = {
    ("top", "baseline"): "reglr (decay 0)",
    ("top", "wd"): "reglr",
    ("top", "fd-ov"): "frob_ov",
    ("top", "fd-qkov"): "frob_qk_ov",
    ("bottom", "wd"): "reglr",
    ("bottom", "wd+si"): "spectral_lin_qk_ov",
    ("bottom", "fd"): "frob_lin_qk_ov",
    ("bottom", "fd+si"): "spectral_lin_qk_ov+frob_lin_qk_ov",
}
MINUTES_PER_RUN = 240  # make.py's TRANSFORMER_MINUTES: the official budget of one 100k-update run
GRID_FILE = "grid.json"
TOP_PNG, BOTTOM_PNG, TABLE = "fig4_top.png", "fig4_bottom.png", "fig4.md"


@dataclass(frozen=True)
class Run:
    """One training run of the grid: a ``train.sh`` variant, rank scale (``None``: dense), SI (``None`` for the
    dense model, which gets no SI flag), coefficient and seed."""

    variant: str  # baseline | wd | fd-ov | fd-qkov
    scale: Optional[float]
    si: Optional[bool]
    coef: float
    seed: int

    @property
    def panel(self) -> str:
        return "top" if self.scale is None else "bottom"

    @property
    def config(self) -> str:
        """The configuration without the seed, e.g. ``0.25/fd-qkov+si/1e-05``."""
        name = self.variant + ("+si" if self.si else "")
        return f"{self.scale or 0:g}/{name}/{self.coef:g}"

    @property
    def name(self) -> str:
        """The run's folder under the sweep's output, ``SCALE/VARIANT[+si]/COEF/seedN``."""
        return f"{self.config}/seed{self.seed}"

    def lines(self) -> Tuple[str, ...]:
        """The lines of its panel this run is a point of (a coefficient-0 run is a point of several)."""
        return lines_of(self.variant, self.scale, self.si, self.coef)

    def train_args(self) -> List[str]:
        """``recipes/iwslt14/train.sh`` arguments of this run."""
        out = [self.variant, "--seed", str(self.seed)]
        if self.variant != "baseline":
            out += ["--coef", f"{self.coef:g}"]
        if self.scale is not None:
            out += ["--rank-scale", f"{self.scale:g}", "--si" if self.si else "--no-si"]
        return out


def lines_of(variant: str, scale: Optional[float], si: Optional[bool], coef: float) -> Tuple[str, ...]:
    """The Figure 4 lines a run is a point of (empty when it is not in the grid's layout)."""
    if scale is None:
        if si:
            return ()
        if variant == "baseline" or coef == 0:
            return ("baseline",) + TOP_LINES
        return (variant,) if variant in TOP_LINES else ()
    suffix = "+si" if si else ""
    if variant == "baseline" or coef == 0:
        return ("wd" + suffix, "fd" + suffix) if variant in ("baseline", "wd", "fd-qkov") else ()
    return {"wd": ("wd" + suffix,), "fd-qkov": ("fd" + suffix,)}.get(variant, ())


def grid(
    dense_coefs: Sequence[float] = DENSE_COEFS,
    compressed_coefs: Sequence[float] = COMPRESSED_COEFS,
    scales: Sequence[float] = SCALES,
    seeds: Sequence[int] = SEEDS,
    top: bool = True,
) -> List[Run]:
    """Every run of Figure 4 (both panels, or the bottom one only), each configuration once per seed."""
    configs: List[Run] = []
    if top:
        configs.append(Run("baseline", None, None, 0.0, 0))
        configs += [Run(v, None, None, c, 0) for v in TOP_LINES for c in dense_coefs if c > 0]
    for scale in scales:
        for si in (False, True):
            configs.append(Run("baseline", scale, si, 0.0, 0))
            configs += [Run(v, scale, si, c, 0) for v in ("wd", "fd-qkov") for c in compressed_coefs if c > 0]
    return [Run(r.variant, r.scale, r.si, r.coef, s) for r in configs for s in seeds]


def select(
    runs: Iterable[Run],
    only: Optional[Sequence[str]] = None,
    scales: Optional[Sequence[float]] = None,
    seeds: Optional[Sequence[int]] = None,
) -> List[Run]:
    """The runs on any of the lines ``only``, at the rank scales ``scales`` (0: the dense top panel), with the
    seeds ``seeds`` (``None``: no filter)."""
    out = []
    for r in runs:
        if only is not None and not set(r.lines()) & set(only):
            continue
        if scales is not None and (r.scale or 0.0) not in scales:
            continue
        if seeds is not None and r.seed not in seeds:
            continue
        out.append(r)
    return out


# ------------------------------------------------------------------------------------------------ results
def run_of(info: dict) -> Optional[Run]:
    """The grid run of a ``grid.json`` record."""
    try:
        return Run(info["variant"], info["scale"], info["si"], float(info["coef"]), int(info["seed"]))
    except (KeyError, TypeError, ValueError):
        return None


def write_grid_file(folder: str, run: Run) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, GRID_FILE), "w") as f:
        json.dump({"grid": "figure4", **asdict(run)}, f, indent=2)


def split_rows(rows: List[dict]) -> Tuple[List[dict], List[dict]]:
    """``(grid rows, other rows)`` of loaded results (``summary.load``): a result is a grid row when its folder
    holds ``grid.json``; the row gets its ``Run`` under ``_grid``."""
    grid_rows, rest = [], []
    for row in rows:
        path = os.path.join(os.path.dirname(row["_path"]), GRID_FILE)
        run = None
        if row.get("metric") == "bleu" and os.path.isfile(path):
            with open(path) as f:
                run = run_of(json.load(f))
        if run is None:
            rest.append(row)
        else:
            grid_rows.append(dict(row, _grid=run))
    return grid_rows, rest


@dataclass
class Point:
    """One point of a panel: its line, rank scale (``None``: dense), coefficient, and BLEU per seed."""

    panel: str
    line: str
    scale: Optional[float]
    coef: float
    valid: Dict[int, float]
    test: Dict[int, float]

    @staticmethod
    def stats(values: Dict[int, float]) -> Tuple[Optional[float], float]:
        xs = list(values.values())
        if not xs:
            return None, 0.0
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def points(rows: List[dict]) -> List[Point]:
    """Grid rows (``split_rows``) gathered into panel points, every line a shared run belongs to included."""
    table: Dict[tuple, Point] = {}
    for row in rows:
        run: Run = row["_grid"]
        subset = row.get("subset")
        if subset not in ("valid", "test"):
            continue
        for line in run.lines():
            key = (run.panel, line, run.scale, run.coef)
            p = table.setdefault(key, Point(run.panel, line, run.scale, run.coef, {}, {}))
            getattr(p, subset)[run.seed] = float(row["bleu"])
    order = {line: i for i, line in enumerate(LINES)}
    return sorted(table.values(), key=lambda p: (p.panel != "top", p.scale or 0, order[p.line], p.coef))


def best_on_valid(pts: List[Point]) -> Dict[tuple, Point]:
    """``{(line, scale): point}``: per bottom-panel line and rank scale, the coefficient with the best mean
    validation BLEU (ties: the smaller coefficient). Test BLEU plays no part in the choice."""
    out: Dict[tuple, Point] = {}
    for p in pts:
        mean, _ = Point.stats(p.valid)
        if mean is None:
            continue
        key = (p.line, p.scale)
        best = out.get(key)
        if (
            best is None
            or mean > Point.stats(best.valid)[0]
            or (mean == Point.stats(best.valid)[0] and p.coef < best.coef)
        ):
            out[key] = p
    return out


def _fmt(values: Dict[int, float]) -> str:
    mean, std = Point.stats(values)
    return "-" if mean is None else f"{mean:.2f} ± {std:.2f}"


def markdown(pts: List[Point], expected: Optional[List[Run]] = None, beams: Sequence[int] = (5,)) -> str:
    """Both panels as tables: every grid point (test and validation BLEU, mean ± standard deviation over seeds),
    the coefficient chosen on validation marked, and the bottom panel's chosen points; grid points of
    ``expected`` runs without results are listed as missing."""
    top = [p for p in pts if p.panel == "top"]
    bottom = [p for p in pts if p.panel == "bottom"]
    chosen = best_on_valid(bottom)
    chosen_top = best_on_valid([p for p in top if p.line != "baseline"])
    out = [
        "## Figure 4 (Sec. 6): IWSLT'14 de-en BLEU",
        "",
        f"BLEU: sacrebleu, detokenized, beam {'/'.join(str(b) for b in beams)}; mean ± standard deviation over the "
        "seeds; the coefficient of a bottom-panel point is chosen on validation BLEU (marked **best on valid**).",
        "",
        "### Top: the dense model, BLEU vs coefficient",
        "",
        "| line | official make.py | coefficient | seeds | valid BLEU | test BLEU | |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for p in top:
        mark = "**best on valid**" if chosen_top.get((p.line, None)) is p else ""
        out.append(
            f"| {p.line} | {OFFICIAL[('top', p.line)]} | {p.coef:g} | {len(p.test)} | {_fmt(p.valid)} | "
            f"{_fmt(p.test)} | {mark} |"
        )
    out += [
        "",
        "### Bottom: compressed models, BLEU vs rank scale (every coefficient)",
        "",
        "| line | official make.py | rank scale | coefficient | seeds | valid BLEU | test BLEU | |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for p in bottom:
        mark = "**best on valid**" if chosen.get((p.line, p.scale)) is p else ""
        out.append(
            f"| {p.line} | {OFFICIAL[('bottom', p.line)]} | {p.scale:g} | {p.coef:g} | {len(p.test)} | "
            f"{_fmt(p.valid)} | {_fmt(p.test)} | {mark} |"
        )
    out += [
        "",
        "### Bottom panel as plotted (coefficient chosen on valid)",
        "",
        "| line | rank scale | coefficient | valid BLEU | test BLEU |",
        "|---|---:|---:|---:|---:|",
    ]
    order = {line: i for i, line in enumerate(LINES)}
    for (line, scale), p in sorted(chosen.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        out.append(f"| {line} | {scale:g} | {p.coef:g} | {_fmt(p.valid)} | {_fmt(p.test)} |")
    if expected is not None:
        have = {(p.panel, p.line, p.scale, p.coef, s) for p in pts for s in p.test if s in p.valid}
        missing = sorted(
            {r.name for r in expected for line in r.lines() if (r.panel, line, r.scale, r.coef, r.seed) not in have}
        )
        if missing:
            out += [
                "",
                f"Missing results ({len(missing)} runs): "
                + ", ".join(missing[:20])
                + (" ..." if len(missing) > 20 else ""),
            ]
    return "\n".join(out) + "\n"


def _save(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def plot_top(pts: List[Point], path: str) -> None:
    """BLEU vs coefficient: one line per regularizer on a log axis, coefficient 0 on its own axis to the left,
    the dense unregularized model as a horizontal line; error bars: standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = [p for p in pts if p.panel == "top"]
    fig, (ax0, ax) = plt.subplots(1, 2, sharey=True, figsize=(8.5, 4.2), gridspec_kw={"width_ratios": [1, 7]})
    base = next((p for p in top if p.line == "baseline"), None)
    markers = {"wd": "o", "fd-ov": "s", "fd-qkov": "D"}
    for line in TOP_LINES:
        sel = sorted((p for p in top if p.line == line and Point.stats(p.test)[0] is not None), key=lambda p: p.coef)
        for axis, part in ((ax0, [p for p in sel if p.coef == 0]), (ax, [p for p in sel if p.coef > 0])):
            if part:
                ys = [Point.stats(p.test) for p in part]
                xs = [p.coef if p.coef > 0 else 0.0 for p in part]
                axis.errorbar(
                    xs,
                    [m for m, _ in ys],
                    yerr=[s for _, s in ys],
                    marker=markers[line],
                    capsize=3,
                    linewidth=1,
                    label=LABELS[line] if axis is ax else None,
                )
    if base is not None and Point.stats(base.test)[0] is not None:
        mean, std = Point.stats(base.test)
        for axis in (ax0, ax):
            axis.axhline(
                mean,
                color="gray",
                linestyle="--",
                linewidth=1,
                label=f"{LABELS['baseline']} ({mean:.2f})" if axis is ax else None,
            )
            if std > 0:
                axis.axhspan(mean - std, mean + std, color="gray", alpha=0.15)
    ax.set_xscale("log")
    ax0.set_xticks([0.0])
    ax0.set_xticklabels(["0"])
    ax0.set_xlim(-1, 1)
    ax0.spines["right"].set_visible(False)
    ax.spines["left"].set_visible(False)
    ax0.set_ylabel("test BLEU")
    ax.set_xlabel("regularization coefficient (log scale; 0 on the left)")
    ax.legend(fontsize=8)
    for axis in (ax0, ax):
        axis.grid(alpha=0.3)
    fig.suptitle("Figure 4 top: dense model, BLEU vs regularization coefficient")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_bottom(pts: List[Point], path: str) -> None:
    """BLEU vs rank scale: one line per {WD, FD} x {SI, no SI}, each point at the coefficient chosen on
    validation BLEU; error bars: standard deviation over seeds; the dense unregularized model for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = best_on_valid([p for p in pts if p.panel == "bottom"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = {"wd": "o", "wd+si": "s", "fd": "^", "fd+si": "D"}
    for line in BOTTOM_LINES:
        sel = sorted(
            (p for (ln, _), p in chosen.items() if ln == line and Point.stats(p.test)[0] is not None),
            key=lambda p: p.scale,
        )
        if sel:
            ys = [Point.stats(p.test) for p in sel]
            ax.errorbar(
                [p.scale for p in sel],
                [m for m, _ in ys],
                yerr=[s for _, s in ys],
                marker=markers[line],
                capsize=3,
                linewidth=1,
                linestyle="-" if line.endswith("+si") else "--",
                label=LABELS[line],
            )
    base = next((p for p in pts if p.panel == "top" and p.line == "baseline"), None)
    if base is not None and Point.stats(base.test)[0] is not None:
        ax.axhline(Point.stats(base.test)[0], color="gray", linestyle=":", linewidth=1, label=LABELS["baseline"])
    scales = sorted({p.scale for p in chosen.values()})
    if scales:
        ax.set_xticks(scales)
        ax.set_xlim(min(scales) - 0.1, max(scales) + 0.1)
    ax.set_xlabel("rank scale R (factorized layers at rank R min(m, n), heads at int(R * 64))")
    ax.set_ylabel("test BLEU (coefficient chosen on valid)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Figure 4 bottom: compressed models, BLEU vs rank scale")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def write(rows: List[dict], out_dir: str, expected: Optional[List[Run]] = None) -> Dict[str, object]:
    """Both panels of grid rows (``split_rows``) into ``out_dir``: ``fig4_top.png``, ``fig4_bottom.png``,
    ``fig4.md``; returns ``{"table", "plots", "markdown", "points"}``."""
    pts = points(rows)
    if not pts:
        raise ValueError(
            "no valid/test BLEU results of the Figure 4 grid: evaluate the runs with eval.sh --subset valid,test"
        )
    os.makedirs(out_dir, exist_ok=True)
    text = markdown(pts, expected, sorted({int(r["beam"]) for r in rows if r.get("beam")}) or [5])
    table = os.path.join(out_dir, TABLE)
    with open(table + ".tmp", "w") as f:
        f.write(text)
    os.replace(table + ".tmp", table)
    plots = []
    if any(p.panel == "top" for p in pts):
        plots.append(os.path.join(out_dir, TOP_PNG))
        plot_top(pts, plots[-1])
    if any(p.panel == "bottom" for p in pts):
        plots.append(os.path.join(out_dir, BOTTOM_PNG))
        plot_bottom(pts, plots[-1])
    return {"table": table, "plots": plots, "markdown": text, "points": pts}


def gpu_hours(runs: List[Run], max_update: int, results_gpu: Optional[str]) -> Tuple[float, str]:
    """``(hours, how)``: the GPU hours of ``runs`` from the measured seconds per update of
    ``bench/results-gpu.json`` (``make gpu-check``: the recipe's dense / FD training on one GPU), else from the
    official code's own budget of :data:`MINUTES_PER_RUN` minutes per 100k-update run."""
    measured: Dict[str, float] = {}
    device = "a GPU"
    if results_gpu and os.path.isfile(results_gpu):
        with open(results_gpu) as f:
            data = json.load(f)
        for rec in data.get("training") or []:
            if rec.get("s_per_update") and str(rec.get("precision", "float32")) in ("float32", "fp32"):
                measured.setdefault(str(rec.get("variant", "")).split(":")[0], float(rec["s_per_update"]))
        device = (data.get("device") or {}).get("name") or device
    if measured:
        fallback = statistics.fmean(measured.values())
        total = sum(measured.get("fd-qkov" if r.variant.startswith("fd") else "baseline", fallback) for r in runs)
        return total * max_update / 3600, (
            f"measured: seconds per update of the recipe's training on {device} "
            f"(bench/results-gpu.json, float32), times {max_update:,} updates"
        )
    hours = len(runs) * MINUTES_PER_RUN / 60 * max_update / 100_000
    return hours, (
        f"not measured: the official code's own budget of {MINUTES_PER_RUN} minutes per 100k-update run "
        "(make.py); run `make gpu-check` on a GPU for a measured estimate"
    )


__all__ = [
    "BOTTOM_LINES",
    "COMPRESSED_COEFS",
    "DENSE_COEFS",
    "LINES",
    "Point",
    "Run",
    "SCALES",
    "SEEDS",
    "TOP_LINES",
    "best_on_valid",
    "gpu_hours",
    "grid",
    "lines_of",
    "markdown",
    "points",
    "select",
    "split_rows",
    "write",
    "write_grid_file",
]


def main(argv=None) -> int:
    from .summary import find_results, load

    p = argparse.ArgumentParser(prog="python -m fnl_transformers.recipes.figure4", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="sweep output folders (or results JSON files)")
    p.add_argument("--out", required=True, help="directory for fig4_top.png, fig4_bottom.png, fig4.md")
    args = p.parse_args(argv)
    try:
        rows, _ = split_rows(load(find_results(args.runs)))
        out = write(rows, args.out)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"{os.environ.get('FNL_PROG', 'figure4')}: error: {exc}", file=sys.stderr)
        return 2
    print(out["markdown"])
    print(f"table: {out['table']}")
    for path in out["plots"]:
        print(f"plot:  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
