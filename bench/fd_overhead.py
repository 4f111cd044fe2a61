"""Item 2. FD overhead in training: one fairseq training step of ``fnl_transformer_iwslt_de_en`` (CPU, about 2k
target tokens a batch) with FD on all forms vs the same model without FD.

Model: FFN and embeddings factorized at rank scale 0.5 (so every kind of form exists), attention QK/OV forms of
every attention. FD run: ``--criterion fd_label_smoothed_cross_entropy --fd-qk --fd-ov --fd-linear
--fd-embedding`` (the penalty in the loss, gradients by autograd); baseline: fairseq's
``label_smoothed_cross_entropy``. Same batches, the two trainers alternating step by step. Target: at most 3%
slower.
"""
from __future__ import annotations

import tempfile

from .common import main, median_times, row
from .fairseq_common import ARCH, CRITERION, Run, make_data, plugin_status, setting, skipped_rows, train_argv

ITEM, QUESTION = 2, "FD overhead in a fairseq training step"
CASE, TARGET = "fnl_transformer_iwslt_de_en, rank scale 0.5, FD on QK, OV, linear, embedding", "<= 1.03x"


def run(quick: bool):
    reason = plugin_status()
    if reason:
        return skipped_rows([CASE], TARGET, reason)
    s = setting(quick)
    with tempfile.TemporaryDirectory(prefix="fnl_bench_") as root:
        data = make_data(root, s["n_train"], mean_len=s["mean_len"], vocab=s["vocab"])
        base = train_argv(data, root + "/ck", ARCH, "--rank-scale", "0.5", *s["dims"], max_tokens=s["max_tokens"])
        plain = Run(base)
        fd = Run(base[: base.index("--criterion")] + [
            "--criterion", CRITERION, "--fd-qk", "1e-4", "--fd-ov", "1e-4", "--fd-linear", "1e-4",
            "--fd-embedding", "1e-4"] + base[base.index("--criterion") + 2:])
        samples = plain.samples(4)
        sample = max(samples, key=lambda x: x["ntokens"])
        t = median_times({"plain": lambda: plain.step(sample), "fd": lambda: fd.step(sample)},
                         repeats=2 if quick else 4)
    ratio = t["fd"] / t["plain"]
    return [row(f"{CASE} ({sample['ntokens']} target tokens)", "no FD", t["plain"], "FD (coupled, in the loss)",
                t["fd"], ratio, "ours / baseline (slowdown)", TARGET, ratio <= 1.03, tokens=int(sample["ntokens"]))]


if __name__ == "__main__":
    main(ITEM, QUESTION, run)
