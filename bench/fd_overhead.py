"""Item 2. FD overhead in training: one fairseq training step of ``fnl_transformer_iwslt_de_en`` (CPU, about 2k
target tokens a batch) with FD on all forms vs the same model without FD.

Two models: the architecture as it is (dense FFN and embeddings: its forms are the QK and OV forms of every
attention), and FFN + embeddings factorized at rank scale 0.5 (every kind of form). FD run: ``--criterion
fd_label_smoothed_cross_entropy --fd-*`` (the penalty in the loss, gradients by autograd); baseline: fairseq's
``label_smoothed_cross_entropy``. Same batch, all trainers alternating step by step. Target: at most 3% slower.

FD costs ``O(sum (m + n) k^2)`` per update whatever the batch, a training step ``O(tokens * sum (m + n) k)`` for
factorized layers, so FD's share of a factorized layer is about ``(2/3) k / tokens``: with rank 256 and 2k tokens
that is ~8% by FLOPs; it shrinks with larger batches (or ``--update-freq``) and smaller ranks.
"""
from __future__ import annotations

import tempfile

from .common import main, median_times, row
from .fairseq_common import ARCH, CRITERION, Run, make_data, plugin_status, setting, skipped_rows, train_argv

ITEM, QUESTION = 2, "FD overhead in a fairseq training step"
TARGET = "<= 1.03x"
CASES = {
    "dense": ("fnl_transformer_iwslt_de_en (dense FFN/embeddings), FD on every QK and OV form", [],
              ["--fd-qk", "1e-4", "--fd-ov", "1e-4"]),
    "lowrank": ("fnl_transformer_iwslt_de_en, FFN + embeddings at rank scale 0.5, FD on QK, OV, linear, embedding",
                ["--rank-scale", "0.5"], ["--fd-qk", "1e-4", "--fd-ov", "1e-4", "--fd-linear", "1e-4",
                                         "--fd-embedding", "1e-4"]),
}


def with_criterion(argv, criterion, flags):
    i = argv.index("--criterion")
    return argv[:i] + ["--criterion", criterion, *flags] + argv[i + 2:]


def run(quick: bool):
    reason = plugin_status()
    if reason:
        return skipped_rows([c for c, _, _ in CASES.values()], TARGET, reason)
    s = setting(quick)
    fns, runs = {}, {}
    with tempfile.TemporaryDirectory(prefix="fnl_bench_") as root:
        data = make_data(root, s["n_train"], mean_len=s["mean_len"], vocab=s["vocab"])
        for key, (_, model_flags, fd_flags) in CASES.items():
            base = train_argv(data, root + "/ck", ARCH, *model_flags, *s["dims"], max_tokens=s["max_tokens"])
            runs[key] = Run(base)
            runs[key + "+fd"] = Run(with_criterion(base, CRITERION, fd_flags))
        sample = max(runs["dense"].samples(4), key=lambda x: x["ntokens"])
        for k, r in runs.items():
            fns[k] = lambda r=r: r.step(sample)
        t = median_times(fns, repeats=2 if quick else 3)
    rows = []
    for key, (case, _, _) in CASES.items():
        ratio = t[key + "+fd"] / t[key]
        rows.append(row(f"{case} ({sample['ntokens']} target tokens)", "no FD", t[key], "FD (coupled, in the loss)",
                        t[key + "+fd"], ratio, "ours / baseline (slowdown)", TARGET, ratio <= 1.03,
                        tokens=int(sample["ntokens"])))
    return rows


if __name__ == "__main__":
    main(ITEM, QUESTION, run)
