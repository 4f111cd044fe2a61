"""Item 3. Low-rank throughput: training tokens per second of ``fnl_transformer_iwslt_de_en`` with FFN and
embeddings factorized at rank scales 0.25 and 0.5 vs the dense model (no ``--rank-scale``), next to the
prediction from FLOP counts (``torch.utils.flop_counter`` on one forward + backward of the same batch).

Speed-up = dense step time / factorized step time (same batch, all trainers alternating); predicted = dense
FLOPs / factorized FLOPs; ratio = speed-up / predicted. Target: at least 0.7 (70% of the predicted speed-up).
"""

from __future__ import annotations

import tempfile

from .common import main, median_times, row
from .fairseq_common import ARCH, Run, make_data, plugin_status, setting, skipped_rows, train_argv, train_flops

ITEM, QUESTION = 3, "Low-rank training throughput vs dense"
SCALES, TARGET = (0.25, 0.5), ">= 0.7 of predicted"


def run(quick: bool):
    reason = plugin_status()
    if reason:
        return skipped_rows([f"rank scale {r}" for r in SCALES], TARGET, reason)
    s = setting(quick)
    with tempfile.TemporaryDirectory(prefix="fnl_bench_") as root:
        data = make_data(root, s["n_train"], mean_len=s["mean_len"], vocab=s["vocab"])
        base = train_argv(data, root + "/ck", ARCH, *s["dims"], max_tokens=s["max_tokens"])
        runs = {"dense": Run(base)}
        for r in SCALES:
            runs[r] = Run(base + ["--rank-scale", str(r)])
        sample = max(runs["dense"].samples(4), key=lambda x: x["ntokens"])
        flops = {k: train_flops(v, sample) for k, v in runs.items()}
        t = median_times({k: (lambda v=v: v.step(sample)) for k, v in runs.items()}, repeats=2)
    tokens = int(sample["ntokens"])
    rows = []
    for r in SCALES:
        speedup, predicted = t["dense"] / t[r], flops["dense"] / flops[r]
        ratio = speedup / predicted
        rows.append(
            row(
                f"rank scale {r} (FFN + embeddings), {tokens} target tokens/step: "
                f"{tokens / t[r]:.0f} vs {tokens / t['dense']:.0f} tokens/s, speed-up {speedup:.2f}x "
                f"(predicted {predicted:.2f}x)",
                "dense",
                t["dense"],
                "factorized",
                t[r],
                ratio,
                "measured speed-up / FLOP-predicted speed-up",
                TARGET,
                ratio >= 0.7,
                speedup=speedup,
                predicted=predicted,
                tokens_per_s=tokens / t[r],
                dense_tokens_per_s=tokens / t["dense"],
                flops=flops[r],
                dense_flops=flops["dense"],
            )
        )
    return rows


if __name__ == "__main__":
    main(ITEM, QUESTION, run)
