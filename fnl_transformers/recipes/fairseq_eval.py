"""BLEU of a checkpoint on the IWSLT subsets: ``fairseq-generate`` in this process, detokenized sacrebleu BLEU, and
the results JSON of ``recipes/iwslt14/eval.sh``.

``python -m fnl_transformers.recipes.fairseq_eval --checkpoint CKPT --data DIR --subsets valid,test --refs R1,R2
[--beam N --batch-size N --lenpen X --user-dir D --recipe-json J --cpu] [-- extra fairseq-generate arguments]``
runs fairseq's own generation (``fairseq_cli.generate``, ``--remove-bpe sentencepiece``) on each subset in one
process (fairseq and the model are loaded once, which matters for a sweep of many small runs), then per subset
reads the ``D-<id>`` lines (plain detokenized text), orders them by sentence id, scores them against the
untouched reference text with sacrebleu's default BLEU (13a tokenization, mixed case, exponential smoothing),
and writes beside the checkpoint ``STEM.SUBSET.generate.txt`` / ``.generate.log`` / ``.hyp.txt`` and
``STEM.SUBSET.results.json``: the score, signature, hypotheses file, parameter counts of the checkpoint's model
and the recipe settings (``recipe.json`` written by ``train.sh`` beside the checkpoint), so ``summary`` can plot
it.
"""

from __future__ import annotations

import argparse
import contextlib
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
        raise EvalError(
            f"{len(hyps)} hypotheses but {len(refs)} references: the reference file does not match the test set"
        )
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
        [checkpoint], arg_overrides={"data": data} if data else None, state=state
    )
    model = models[0]
    total = embedding = 0
    for name, p in model.named_parameters():  # named_parameters() yields a shared tensor once
        total += p.numel()
        if "embed_tokens" in name or "output_projection" in name:
            embedding += p.numel()
    return {
        "params": total,
        "params_embedding": embedding,
        "params_nonembedding": total - embedding,
        "updates": int(history[-1].get("num_updates", 0)),
    }


@contextlib.contextmanager
def log_to(path: str, mode: str = "a"):
    """Python logging (fairseq's) and warnings (hydra's) go to the file ``path`` inside the block."""
    import logging

    root = logging.getLogger()
    handler = logging.FileHandler(path, mode=mode, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s"))
    saved = root.handlers[:], root.level
    root.handlers, root.level = [handler], logging.INFO  # fairseq's basicConfig then leaves the log here
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        handler.close()
        root.handlers, root.level = saved


def generate(
    data: str,
    checkpoint: str,
    subset: str,
    out_txt: str,
    log_path: str,
    beam: int,
    batch_size: int,
    lenpen: float,
    user_dir: Optional[str],
    cpu: bool,
    extra: List[str],
) -> None:
    """``fairseq-generate`` of ``subset`` in this process: hypotheses to ``out_txt``, fairseq's log to
    ``log_path``. A failure raises ``EvalError("fairseq-generate failed: Type: first line")``."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import generate as fairseq_generate

    argv = [
        data,
        "--path",
        checkpoint,
        "--gen-subset",
        subset,
        "--beam",
        str(beam),
        "--batch-size",
        str(batch_size),
        "--lenpen",
        str(lenpen),
        "--remove-bpe",
        "sentencepiece",
        "--log-format",
        "simple",
    ]
    argv += (["--user-dir", user_dir] if user_dir else []) + (["--cpu"] if cpu else []) + list(extra)
    tmp = out_txt + ".tmp"
    with log_to(log_path, mode="w"):
        try:
            args = options.parse_args_and_arch(options.get_generation_parser(), argv)
            with open(tmp, "w", encoding="utf-8") as f:
                fairseq_generate._main(convert_namespace_to_omegaconf(args), f)
            os.replace(tmp, out_txt)
        except (Exception, SystemExit) as exc:
            if os.path.exists(tmp):
                os.remove(tmp)
            first = (str(exc).strip().splitlines() or [""])[0]
            raise EvalError(f"fairseq-generate failed: {type(exc).__name__}: {first} (log: {log_path})") from exc


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        prog="python -m fnl_transformers.recipes.fairseq_eval", description=__doc__.splitlines()[0]
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="the binarized data directory")
    p.add_argument("--subsets", default="test", help="comma-separated subsets (valid, test)")
    p.add_argument(
        "--refs",
        required=True,
        help="reference text per subset (comma-separated, in --subsets order), one line per sentence in subset order",
    )
    p.add_argument("--user-dir", help="fairseq --user-dir (the plugin)")
    p.add_argument("--recipe-json", help="train.sh's recipe.json with the run's settings")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    prog = os.environ.get("FNL_PROG", "fairseq_eval")
    subsets, refs = args.subsets.split(","), args.refs.split(",")
    if len(subsets) != len(refs):
        print(f"{prog}: error: {len(subsets)} subsets but {len(refs)} reference files", file=sys.stderr)
        return 2
    ckpt = os.path.abspath(args.checkpoint)
    folder, stem = os.path.dirname(ckpt), os.path.splitext(os.path.basename(ckpt))[0]
    recipe = {}
    if args.recipe_json and os.path.isfile(args.recipe_json):
        with open(args.recipe_json) as f:
            recipe = json.load(f)
    info = None
    for subset, ref in zip(subsets, refs):
        base = os.path.join(folder, f"{stem}.{subset}")
        out, hyp_out, gen = base + ".results.json", base + ".hyp.txt", base + ".generate.txt"
        for old in (out, hyp_out):  # never leave an old result beside a new, failed evaluation
            if os.path.exists(old):
                os.remove(old)
        print(f"fairseq-generate {subset}, beam {args.beam}: {ckpt}", flush=True)
        try:
            generate(
                args.data,
                ckpt,
                subset,
                gen,
                base + ".generate.log",
                args.beam,
                args.batch_size,
                args.lenpen,
                args.user_dir,
                args.cpu,
                extra,
            )
            hyps = read_hypotheses(gen)
            with open(ref, encoding="utf-8") as f:
                score, signature, full = bleu(hyps, f.read().splitlines())
        except (EvalError, FileNotFoundError) as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        with open(hyp_out + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(h + "\n" for h in hyps)
        os.replace(hyp_out + ".tmp", hyp_out)
        if info is None:
            with log_to(base + ".generate.log"):
                info = checkpoint_info(ckpt, args.user_dir, args.data)
        result = {
            "recipe": "iwslt14",
            "metric": "bleu",
            "score": round(score, 2),
            "bleu": round(score, 2),
            "bleu_detail": str(full),
            "sacrebleu_signature": signature,
            "subset": subset,
            "beam": args.beam,
            "sentences": len(hyps),
            "checkpoint": ckpt,
            "hypotheses": hyp_out,
        }
        result.update({k: v for k, v in recipe.items() if k not in result})
        result.update(info)
        _write_json(out, result)
        print(f"BLEU = {score:.2f}  ({subset}: {len(hyps)} sentences, {result['params']:,} parameters)")
        print(f"sacrebleu signature: {signature}")
        print(f"results: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
