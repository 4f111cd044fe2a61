"""Detokenized BLEU of ``fairseq-generate`` output and the results JSON of ``recipes/iwslt14/eval.sh``.

``python -m fnl_transformers.recipes.fairseq_eval GEN_OUT --ref REF --checkpoint CKPT --out JSON``
reads the ``D-<id>`` lines (hypotheses after ``--remove-bpe sentencepiece``: plain detokenized text), orders
them by sentence id, scores them against the untouched reference text with sacrebleu's default BLEU
(13a tokenization, mixed case, exponential smoothing) and prints the score with sacrebleu's signature.
The JSON holds the score, signature, hypotheses file, parameter counts of the checkpoint's model and the
recipe settings (``recipe.json`` written by ``train.sh`` beside the checkpoint), so ``summary`` can plot it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional

_LINE = re.compile(r"^D-(\d+)\t([^\t]*)\t?(.*)$")


class EvalError(ValueError):
    pass


def read_hypotheses(gen_out: str) -> List[str]:
    """Hypotheses from ``fairseq-generate`` output, ordered by sentence id (one per id, best beam first)."""
    hyps: Dict[int, str] = {}
    with open(gen_out, encoding="utf-8") as f:
        for line in f:
            m = _LINE.match(line.rstrip("\n"))
            if m and int(m.group(1)) not in hyps:  # with --nbest > 1 keep the best
                hyps[int(m.group(1))] = m.group(3)
    if not hyps:
        raise EvalError(f"no 'D-<id>' hypothesis lines in {gen_out}: did fairseq-generate fail? (see its log)")
    ids = sorted(hyps)
    if ids != list(range(len(ids))):
        missing = sorted(set(range(ids[-1] + 1)) - set(ids))[:5]
        raise EvalError(f"{gen_out} lacks hypotheses for sentence ids {missing}...: generation was incomplete")
    return [hyps[i] for i in ids]


def bleu(hyps: List[str], refs: List[str]):
    """(score, signature, BLEUScore) with sacrebleu's default detokenized BLEU."""
    from sacrebleu.metrics import BLEU

    if len(hyps) != len(refs):
        raise EvalError(f"{len(hyps)} hypotheses but {len(refs)} references: the reference file does not match the "
                        "test set")
    metric = BLEU()
    score = metric.corpus_score(hyps, [refs])
    return score.score, str(metric.get_signature()), score


def checkpoint_info(checkpoint: str, user_dir: Optional[str] = None, data: Optional[str] = None) -> Dict[str, int]:
    """Updates trained and parameters of the checkpoint's model (shared tensors counted once, split into
    embedding and rest), loaded the way ``fairseq-generate`` loads it."""
    from fairseq import checkpoint_utils, utils

    if user_dir:
        utils.import_user_module(argparse.Namespace(user_dir=user_dir))
    state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint)
    history = state.get("optimizer_history") or [{}]
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task(
        [checkpoint], arg_overrides={"data": data} if data else None, state=state)
    model = models[0]
    total = embedding = 0
    for name, p in model.named_parameters():  # named_parameters() yields a shared tensor once
        total += p.numel()
        if "embed_tokens" in name or "output_projection" in name:
            embedding += p.numel()
    return {"params": total, "params_embedding": embedding, "params_nonembedding": total - embedding,
            "updates": int(history[-1].get("num_updates", 0))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fnl_transformers.recipes.fairseq_eval",
                                description=__doc__.splitlines()[0])
    p.add_argument("gen_out", help="fairseq-generate stdout")
    p.add_argument("--ref", required=True, help="reference text, one line per test sentence, in test-set order")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="results JSON to write")
    p.add_argument("--hyp-out", help="write the ordered hypotheses here")
    p.add_argument("--user-dir", help="fairseq --user-dir for loading the checkpoint")
    p.add_argument("--data", help="the binarized data directory (when it moved since training)")
    p.add_argument("--recipe-json", help="train.sh's recipe.json with the run's settings")
    p.add_argument("--subset", default="test")
    p.add_argument("--beam", type=int, default=5)
    args = p.parse_args(argv)
    try:
        hyps = read_hypotheses(args.gen_out)
        with open(args.ref, encoding="utf-8") as f:
            refs = f.read().splitlines()
        score, signature, full = bleu(hyps, refs)
    except (EvalError, FileNotFoundError) as exc:
        print(f"{os.environ.get('FNL_PROG', 'fairseq_eval')}: error: {exc}", file=sys.stderr)
        return 2
    result = {"recipe": "iwslt14", "metric": "bleu", "score": round(score, 2), "bleu": round(score, 2),
              "bleu_detail": str(full), "sacrebleu_signature": signature, "subset": args.subset,
              "beam": args.beam, "sentences": len(hyps), "checkpoint": os.path.abspath(args.checkpoint)}
    if args.hyp_out:
        with open(args.hyp_out + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(h + "\n" for h in hyps)
        os.replace(args.hyp_out + ".tmp", args.hyp_out)
        result["hypotheses"] = os.path.abspath(args.hyp_out)
    if args.recipe_json and os.path.isfile(args.recipe_json):
        with open(args.recipe_json) as f:
            result.update({k: v for k, v in json.load(f).items() if k not in result})
    result.update(checkpoint_info(args.checkpoint, args.user_dir, args.data))
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    os.replace(tmp, args.out)
    print(f"BLEU = {score:.2f}  ({len(hyps)} sentences, {result['params']:,} parameters)")
    print(f"sacrebleu signature: {signature}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
