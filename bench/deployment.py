"""Item 6. Deployment: a recomposed (multiplied-out, ``fnl recompose``) ``fnl_transformer_iwslt_de_en`` checkpoint
vs a stock fairseq ``transformer_iwslt_de_en`` of the same shape: beam-search generation time on the same test
batches (both are stock ``transformer`` models, so the ratio should be 1), and the recomposed model's
translations vs those of the factorized model it came from (identical tokens expected).

The fnl model: FFN and embeddings at rank scale 0.5, one training update (random-quality translations; the
comparison is of function, not quality). Every hypothesis is forced to the same length (``min_len = max_len``),
so every model does the same decoding work. Target: time ratio 1.00 +- 0.05 and identical outputs.
"""

from __future__ import annotations

import os
import tempfile

import torch

from .common import main, median_times, row
from .fairseq_common import ARCH, Run, fairseq_cli, make_data, plugin_status, quiet, setting, skipped_rows, train_argv

ITEM, QUESTION = 6, "Deployment: recomposed model vs stock transformer, generation"
CASE, TARGET = "recomposed fnl (rank scale 0.5) vs stock transformer_iwslt_de_en, beam 4", "1.00 +- 0.05, identical"
LENGTH = 30  # generated tokens per sentence (forced: EOS only at this length)


def checkpoint(argv, path: str) -> str:
    """One training update, then the trainer's checkpoint (fairseq's own format) at ``path``."""
    run = Run(argv)
    run.step(run.samples(1)[0])
    with quiet():
        run.trainer.consolidate_optimizer()  # as fairseq's checkpoint_utils.save_checkpoint does
        run.trainer.save_checkpoint(path, {})
    return path


class Generator:
    def __init__(self, path: str, max_sentences: int):
        from fairseq import checkpoint_utils

        with quiet():
            models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path])
            task.load_dataset("test")
        self.model = models[0].eval()
        self.task = task
        cfg.generation.beam = 4
        # every hypothesis exactly LENGTH tokens: the same decoding work for every model, whatever its weights
        cfg.generation.max_len_a, cfg.generation.max_len_b, cfg.generation.min_len = 0, LENGTH, LENGTH
        self.generator = task.build_generator(models, cfg.generation)
        itr = task.get_batch_iterator(
            dataset=task.dataset("test"), max_sentences=max_sentences, max_tokens=None
        ).next_epoch_itr(shuffle=False)
        self.batches = list(itr)

    @torch.no_grad()
    def __call__(self):
        out = {}
        for sample in self.batches:
            hyps = self.task.inference_step(self.generator, [self.model], sample)
            for i, sid in enumerate(sample["id"].tolist()):
                out[sid] = hyps[i][0]["tokens"].tolist()
        return out


def run(quick: bool):
    reason = plugin_status()
    if reason:
        return skipped_rows([CASE], TARGET, reason)
    s = setting(quick)
    with tempfile.TemporaryDirectory(prefix="fnl_bench_") as root:
        data = make_data(root, s["n_train"], n_test=16, mean_len=s["mean_len"], vocab=s["vocab"])
        fnl = checkpoint(
            train_argv(data, root + "/ck1", ARCH, "--rank-scale", "0.5", *s["dims"], max_tokens=s["max_tokens"]),
            os.path.join(root, "fnl.pt"),
        )
        stock = checkpoint(
            train_argv(data, root + "/ck2", "transformer_iwslt_de_en", *s["dims"], max_tokens=s["max_tokens"]),
            os.path.join(root, "stock.pt"),
        )
        recomposed = os.path.join(root, "recomposed.pt")
        fairseq_cli("fnl_transformers.cli", ["recompose", fnl, recomposed])
        gens = {
            k: Generator(p, max_sentences=8 if quick else 16)
            for k, p in (("stock", stock), ("recomposed", recomposed), ("fnl", fnl))
        }
        outs = {k: g() for k, g in gens.items()}
        t = median_times(gens, repeats=2 if quick else 3)
        shapes = {
            k: sorted((n, tuple(p.shape)) for n, p in g.model.named_parameters()) for k, g in gens.items() if k != "fnl"
        }
    same_shape = [shape for _, shape in shapes["stock"]] == [shape for _, shape in shapes["recomposed"]]
    identical = sum(outs["recomposed"][i] == outs["fnl"][i] for i in outs["fnl"])
    n = len(outs["fnl"])
    ratio = t["recomposed"] / t["stock"]
    met = bool(abs(ratio - 1) <= 0.05 and identical == n and same_shape)
    return [
        row(
            f"{CASE}: {n} sentences, {identical}/{n} translations identical to the factorized model's; "
            f"same parameter shapes as stock: {same_shape}",
            "stock transformer",
            t["stock"],
            "recomposed",
            t["recomposed"],
            ratio,
            "ours / baseline (time)",
            TARGET,
            met,
            identical=identical,
            sentences=n,
            same_shape=same_shape,
        ),
        row(
            "factorized fnl model (before recompose) vs recomposed, beam 4",
            "recomposed",
            t["recomposed"],
            "fnl (factorized)",
            t["fnl"],
            t["fnl"] / t["recomposed"],
            "ours / baseline (time)",
            "report",
            None,
        ),
    ]


if __name__ == "__main__":
    main(ITEM, QUESTION, run)
