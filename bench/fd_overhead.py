"""Item 2. FD overhead in training: one fairseq training step with coupled FD (``--criterion
fd_label_smoothed_cross_entropy --fd-*``: the penalty in the loss, its closed-form gradient in the backward) vs
the same model without FD (fairseq's ``label_smoothed_cross_entropy``), at the paper's batch sizes: about 1.5k and
4k target tokens per update.

Models: the paper's IWSLT model (``fnl_transformer_small``, the official ``transformer_small``: 2 + 2 layers,
d 256, FFN 1024, 4 heads of 64, pre-norm, untied output projection) and ``fnl_transformer_iwslt_de_en`` (6 + 6
layers, d 512, FFN 1024, 4 heads of 128). Each as it is (dense FFN and embeddings: FD on every QK and OV form)
and with FFN + embeddings factorized at rank scale 0.5 (FD on every kind of form). Same batch for both trainers, steps
alternating; each of 3 independent repeats builds fresh trainers and takes the median of 7 rounds' ratios (each
round: one step of each, adjacent in time); a target counts as met only when the worst repeat meets it.
Targets: at most 3% slower at 1.5k tokens, 1.5% at 4k.

FD costs ``4 sum (H m + G n) k^2`` FLOPs per update whatever the batch, a training step about ``6 tokens sum m n``
(dense) or ``6 tokens sum (m + n) k`` (factorized), so FD's share falls with the batch; each row states FD's share
of the step's FLOPs (``torch.utils.flop_counter``), the floor of its share of the time.

Scaling rows: the FD computation alone (penalty and its backward) of ``fnl_transformer_iwslt_de_en`` with 6, 12
and 24 layers (half encoder, half decoder), per layer relative to 6 layers: linear means 1.
"""

from __future__ import annotations

import gc
import statistics
import tempfile

import torch

from .common import main, median_times, paired_ratios, repeats_summary, row
from .fairseq_common import (
    ARCH,
    CRITERION,
    QUICK_DIMS,
    Run,
    make_data,
    plugin_status,
    skipped_rows,
    train_argv,
    train_flops,
)

ITEM, QUESTION = 2, "FD overhead in a fairseq training step"
REPEATS = 3
ROUNDS = 7  # per repeat: one step of each trainer per round, after one warm-up round; a repeat's ratio is the
# median of its rounds' ratios (a single step's ratio scatters by a few percent on a shared machine)
MODELS = {  # name -> (arch, whether the output projection shares the decoder's input embedding)
    # the official model's output projection is its own
    "fnl_transformer_small (the paper's IWSLT model: 2+2 layers, d 256, 4 heads of 64, pre-norm)": (
        "fnl_transformer_small",
        False,
    ),
    "fnl_transformer_iwslt_de_en (6+6 layers, d 512)": (ARCH, True),
}

VARIANTS = {  # name -> (model flags, FD flags)
    "dense FFN/embeddings, FD on every QK and OV form": ([], ["--fd-qk", "1e-4", "--fd-ov", "1e-4"]),
    "FFN + embeddings at rank scale 0.5, FD on QK, OV, linear, embedding": (
        ["--rank-scale", "0.5"],
        ["--fd-qk", "1e-4", "--fd-ov", "1e-4", "--fd-linear", "1e-4", "--fd-embedding", "1e-4"],
    ),
}
BATCHES = {1500: 0.03, 4000: 0.015}  # target tokens per update -> largest allowed slowdown
FD_ALL = dict(qk=1e-4, ov=1e-4, linear=1e-4, embedding=1e-4)


def with_criterion(argv, criterion, flags):
    i = argv.index("--criterion")
    return argv[:i] + ["--criterion", criterion, *flags] + argv[i + 2 :]


def with_max_tokens(argv, max_tokens: int):
    i = argv.index("--max-tokens")
    return argv[:i] + ["--max-tokens", str(max_tokens)] + argv[i + 2 :]


def pick_sample(run: Run, tokens: int, n: int = 8):
    """Of the first ``n`` batches, the one whose target token count is closest to ``tokens``."""
    return min(run.samples(n), key=lambda s: abs(int(s["ntokens"]) - tokens))


def fd_flops(model) -> int:
    """FLOPs of the FD penalty of every form and its backward (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fnl_transformers.core import frobenius_penalty

    counter = FlopCounterMode(display=False)
    with counter:
        frobenius_penalty(model, **FD_ALL).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def overhead_rows(data: str, root: str, quick: bool):
    rounds = 2 if quick else ROUNDS
    repeats = 2 if quick else REPEATS
    batches = {128: 0.03, 256: 0.015} if quick else BATCHES
    cases = []
    for model_name, (arch, tie_output) in MODELS.items():
        for variant, (model_flags, fd_flags) in VARIANTS.items():
            dims = QUICK_DIMS if quick else []
            base = train_argv(data, root + "/ck", arch, *model_flags, *dims, tie_output=tie_output)
            for tokens in batches:
                cases.append((model_name, variant, tokens, base, fd_flags))
    results = {i: [] for i in range(len(cases))}
    info = {}
    for _ in range(repeats):  # the cases interleaved in time: each repeat of a case at another moment
        for i, (_, _, tokens, base_argv, fd_flags) in enumerate(cases):
            argv = with_max_tokens(base_argv, int(tokens * 1.35))
            runs = {"no FD": Run(argv), "FD": Run(with_criterion(argv, CRITERION, fd_flags))}
            sample = pick_sample(runs["no FD"], tokens)
            if i not in info:
                info[i] = dict(
                    tokens=int(sample["ntokens"]),
                    step_flops=train_flops(runs["no FD"], sample),
                    fd_flops=fd_flops(runs["FD"].model),
                )
            run_base, run_fd = runs["no FD"], runs["FD"]
            ratios, (base_s, fd_s) = paired_ratios(
                lambda r=run_base, s=sample: r.step(s), lambda r=run_fd, s=sample: r.step(s), rounds
            )
            results[i].append(dict(ratio=statistics.median(ratios), base=base_s, fd=fd_s))
            del runs, sample, run_base, run_fd
            gc.collect()
    rows = []
    for i, (model_name, variant, tokens, _, _) in enumerate(cases):
        ratios = [t["ratio"] for t in results[i]]
        limit = 1 + batches[tokens]
        summary = repeats_summary(ratios, higher_is_better=False, limit=limit)
        share = info[i]["fd_flops"] / info[i]["step_flops"]
        base_s = statistics.median(t["base"] for t in results[i])
        ours_s = statistics.median(t["fd"] for t in results[i])
        rows.append(
            row(
                f"{model_name}, {variant}: {info[i]['tokens']} target tokens (FD = {100 * share:.1f}% of the "
                "step's FLOPs)",
                "no FD",
                base_s,
                "FD (coupled, in the loss)",
                ours_s,
                summary["ratio"],
                "ours / baseline (slowdown)",
                f"<= {limit:.3f}x",
                summary["met"],
                repeats=summary["repeats"],
                spread=summary["spread"],
                worst=summary["worst"],
                fd_flop_share=share,
                **info[i],
            )
        )
    return rows


def scaling_rows(data: str, root: str, quick: bool):
    """FD alone (penalty + backward) vs depth: per-layer cost relative to the shallowest model."""
    from fnl_transformers.core import frobenius_penalty

    depths = (2, 4) if quick else (6, 12, 24)
    dims = QUICK_DIMS if quick else []
    times = {L: [] for L in depths}
    for _ in range(2 if quick else REPEATS):
        for L in depths:
            argv = train_argv(
                data, root + "/ck", ARCH, *dims, "--encoder-layers", str(L // 2), "--decoder-layers", str(L // 2)
            )
            model = Run(argv).model

            def fd(model=model):
                model.zero_grad(set_to_none=True)
                frobenius_penalty(model, qk=1e-4, ov=1e-4).backward()

            times[L].append(median_times({"fd": fd}, 3 if quick else 5, warmup=1)["fd"])
            del model, fd
            gc.collect()
    rows = []
    L0 = depths[0]
    for L in depths:
        per_layer = [t / L for t in times[L]]
        ratios = [p / (sorted(times[L0])[len(times[L0]) // 2] / L0) for p in per_layer]
        summary = repeats_summary(ratios, higher_is_better=False, limit=None if L == L0 else 1.15)
        med = sorted(times[L])[len(times[L]) // 2]
        rows.append(
            row(
                f"scaling: FD alone (penalty + backward, QK and OV forms) of {ARCH} with {L} layers "
                f"({L // 2}+{L // 2}): {1e3 * med / L:.2f} ms per layer",
                f"{L0} layers, per layer",
                sorted(times[L0])[len(times[L0]) // 2] / L0 * L,
                f"{L} layers",
                med,
                summary["ratio"],
                "per-layer FD time / per-layer FD time at the shallowest depth (linear: 1)",
                "report" if L == L0 else "<= 1.15 (linear)",
                summary["met"],
                repeats=summary["repeats"],
                spread=summary["spread"],
                worst=summary["worst"],
                layers=L,
            )
        )
    return rows


def run(quick: bool):
    reason = plugin_status()
    if reason:
        cases = [f"{m}, {v}, {t} tokens" for m in MODELS for v in VARIANTS for t in BATCHES]
        return skipped_rows(cases, "<= 1.03x / 1.015x", reason)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="fnl_bench_") as root:
        data = make_data(root, 96 if quick else 2000, mean_len=10 if quick else 24, vocab=300 if quick else 8000)
        return overhead_rows(data, root, quick) + scaling_rows(data, root, quick)


if __name__ == "__main__":
    main(ITEM, QUESTION, run)
