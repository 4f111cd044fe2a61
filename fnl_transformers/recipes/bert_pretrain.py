"""BERT pretraining with LAMB, LAMB + coupled FD, or FLAMBe (paper Sec. 6, Table 4) for ``recipes/bert/pretrain.sh``.

The three optimizers of Table 4, each with the full per-head dimension or half of it:

* ``lamb``: LAMB with weight decay on every weight (biases and LayerNorms undecayed, as everywhere here).
* ``lamb-fd``: "the simple FD modification of LAMB": Frobenius decay (Definition 3.2) of the attention OV forms
  added to the loss, ``lambda/2 sum_h ||W_o,h W_v,h||_F^2`` (Sec. 2.3, Eq. (1); ``FNLTrainer`` in coupled mode),
  with plain LAMB: weight decay elsewhere, neither FD nor weight decay on the OV factors in the optimizer.
* ``flambe``: FLAMBe, LAMB whose decay term on the OV factors is decoupled FD with the same coefficient
  ``lambda`` (``--fd-ov``), weight decay elsewhere. Its heads start balanced by per-head SI (Definition 3.1),
  also at full head dim, as in the paper.

Both FD variants take their groups from :func:`fnl_transformers.optim.param_groups` (the factors of FD forms
in one group without weight decay); ``lamb-fd`` gives that group to ``Lamb`` without its FD entries, because
its FD is in the loss. Half head dim: the fresh model's heads are reduced by per-head SI
(:func:`fnl_transformers.hf.patch_model` with ``FNLConfig(head_dim=...)``).

Schedule (NVIDIA DeepLearningExamples' BERT LAMB recipe, :data:`NVIDIA_PHASES`): ``--objective mlm-nsp``
(``BertForPreTraining``: masked LM + next-sentence prediction on sentence pairs,
:mod:`fnl_transformers.recipes.bert_data`) or ``mlm`` (``BertForMaskedLM`` on full blocks); ``--phase 1``
(sequence length 128) then ``--phase 2 --resume PHASE1_OUT`` (length 512, phase 1's model and optimizer
state, the phase-2 learning rate, warmup and length); warmup + polynomial decay
(:mod:`fnl_transformers.recipes.schedule`). NVIDIA's global batch is reached on one device by gradient
accumulation. The global gradient norm is clipped to 1 before each update (NVIDIA's LAMB pre-normalization).

Output (``--out``): ``model/`` (``save_pretrained``; loadable with ``fnl_transformers.hf.from_pretrained`` and by
``recipes/bert/squad.sh --model``), ``optimizer.pt`` (the state phase 2 resumes), ``loss_curve.json`` (held-out
MLM loss at ``--curve-points`` points of the run, and the training loss) and ``mlm.eval.results.json`` (the
held-out MLM loss and accuracy with a fixed masking, NSP loss and accuracy, a no-context unigram baseline).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from collections import Counter
from typing import Dict, List, Optional

from . import run_cli
from .bert_data import DataError, Rows, build_rows, held_out_split, read_documents, tokenize_documents
from .squad import RecipeError, count_params, minilm_path

OPTIMIZERS = ("lamb", "lamb-fd", "flambe")
OBJECTIVES = ("mlm", "mlm-nsp")
PHASES = (1, 2)

# NVIDIA DeepLearningExamples, PyTorch/LanguageModeling/BERT/scripts/run_pretraining.sh (8 GPUs):
# global batch = per-GPU batch x GPUs, micro_batch = what one GPU holds (per-GPU batch / accumulation steps).
NVIDIA_PHASES = {
    1: {
        "seq_len": 128,
        "max_predictions": 20,
        "global_batch": 65536,
        "micro_batch": 64,
        "lr": 6e-3,
        "warmup": 0.2843,
        "steps": 7038,
    },
    2: {
        "seq_len": 512,
        "max_predictions": 80,
        "global_batch": 32768,
        "micro_batch": 8,
        "lr": 4e-3,
        "warmup": 0.128,
        "steps": 1563,
    },
}
# NVIDIA's FusedLAMB settings (run_pretraining.py): betas, eps, weight decay, global gradient-norm threshold.
NVIDIA_LAMB = {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "max_grad_norm": 1.0}
# --smoke: a tiny model on generated text, a few minutes for both phases on one CPU core.
SMOKE_PHASES = {
    1: {"seq_len": 64, "micro_batch": 32, "grad_accum": 1, "lr": 1e-2, "warmup": 0.1, "steps": 300},
    2: {"seq_len": 128, "micro_batch": 16, "grad_accum": 1, "lr": 5e-3, "warmup": 0.1, "steps": 100},
}
FD_DEFAULT = 0.01  # --fd-ov when not tuned (recipes/bert/sweep.sh tunes it)
EVAL_SEED = 1234  # the held-out masking
PAIRS_SEED = 12345  # the held-out sentence pairs
MHA_SI_FIELDS = ("spectral_init_qk", "spectral_init_ov")
RESULTS = "mlm.eval.results.json"


def phase_settings(phase: int, smoke: bool) -> Dict[str, float]:
    """Defaults of one phase: NVIDIA's, with the global batch reached by gradient accumulation on one device."""
    if smoke:
        return dict(SMOKE_PHASES[phase])
    p = NVIDIA_PHASES[phase]
    return {
        "seq_len": p["seq_len"],
        "micro_batch": p["micro_batch"],
        "grad_accum": p["global_batch"] // p["micro_batch"],
        "lr": p["lr"],
        "warmup": p["warmup"],
        "steps": p["steps"],
    }


def mha_spectral_init_fields() -> Dict[str, bool]:
    """``{spectral_init_qk: True, spectral_init_ov: True}``: per-head SI of the QK and OV forms at any head dim,
    or ``{}`` where :class:`~fnl_transformers.hf.FNLConfig` has no such fields (heads then start balanced by
    SI only where they shrink)."""
    from ..hf import FNLConfig

    params = inspect.signature(FNLConfig).parameters
    return {f: True for f in MHA_SI_FIELDS if f in params}


def build_optimizer(model, optimizer: str, lr: float, weight_decay: float, fd_ov: float):
    """The optimizer of ``optimizer`` (``lamb``, ``lamb-fd``, ``flambe``) with NVIDIA's LAMB settings.

    Groups: :func:`fnl_transformers.optim.param_groups` (biases and normalization layers undecayed). ``flambe``:
    the OV factors get decoupled FD ``fd_ov`` in FLAMBe; ``lamb-fd``: the same groups with the FD entries
    removed, so the OV factors get neither FD nor weight decay from ``Lamb`` (their FD is in the loss);
    ``lamb``: weight decay on every weight."""
    from ..optim import FLAMBe, Lamb, param_groups

    if optimizer not in OPTIMIZERS:
        raise RecipeError(f"unknown optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    kw = dict(lr=lr, betas=NVIDIA_LAMB["betas"], eps=NVIDIA_LAMB["eps"])
    if optimizer == "lamb":
        return Lamb(param_groups(model, weight_decay=weight_decay), **kw)
    groups = param_groups(model, fd_ov=fd_ov, weight_decay=weight_decay)
    if optimizer == "flambe":
        return FLAMBe(groups, **kw)
    return Lamb([{k: v for k, v in g.items() if k not in ("fd", "fd_forms")} for g in groups], **kw)


def fd_mode(optimizer: str) -> str:
    """Where FD acts: in the loss (``lamb-fd``), in the optimizer (``flambe``); ``lamb`` has none."""
    return "decoupled" if optimizer == "flambe" else "coupled"


def make_trainer(
    model, optimizer: str, fd_ov: float, opt, scheduler, training_args, train_dataset, collator, callbacks=()
):
    """:class:`fnl_transformers.hf.FNLTrainer` with the FD of ``optimizer``: ``lambda/2 sum_h ||W_o,h W_v,h||_F^2``
    in the loss for ``lamb-fd``, FLAMBe's decoupled FD for ``flambe``, none for ``lamb``."""
    from ..hf import FNLTrainer

    coef = 0.0 if optimizer == "lamb" else fd_ov
    return FNLTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        fnl_config={"linear": 0.0, "embedding": 0.0, "qk": 0.0, "ov": coef},
        fd=fd_mode(optimizer),
        optimizers=(opt, scheduler),
        callbacks=list(callbacks),
    )


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(
    model,
    rows: List[dict],
    collator,
    objective: str,
    freq: Optional[Counter] = None,
    vocab_size: int = 0,
    batch_size: int = 32,
) -> Dict[str, float]:
    """Held-out MLM loss / accuracy (and NSP loss / accuracy) with a fixed masking (seed :data:`EVAL_SEED`;
    the training random state is left as it was); with ``freq``, the add-one-smoothed unigram baseline."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    s = Counter()
    total = sum(freq.values()) if freq else 0
    top = freq.most_common(1)[0][0] if freq else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(EVAL_SEED)
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collator(rows[i : i + batch_size]).items()}
            labels, nsp = batch.pop("labels"), batch.pop("next_sentence_label", None)
            out = model(**batch)
            logits = out.prediction_logits if objective == "mlm-nsp" else out.logits
            mask = labels != -100
            gold = labels[mask]
            s["mlm_loss"] += F.cross_entropy(logits[mask].float(), gold, reduction="sum").item()
            s["mlm_correct"] += (logits[mask].argmax(-1) == gold).sum().item()
            s["masked"] += int(mask.sum())
            if nsp is not None:
                rel = out.seq_relationship_logits.float()
                s["nsp_loss"] += F.cross_entropy(rel, nsp, reduction="sum").item()
                s["nsp_correct"] += (rel.argmax(-1) == nsp).sum().item()
                s["pairs"] += len(nsp)
            if freq:
                for t in gold.tolist():
                    s["uni_loss"] -= math.log((freq.get(t, 0) + 1) / (total + vocab_size))
                    s["uni_correct"] += t == top
    model.train(was_training)
    if s["masked"] == 0:
        raise RecipeError(
            "no token of the held-out data was masked (is the tokenizer mapping everything to "
            "[UNK]?): check --tokenizer against the corpus"
        )
    n = s["masked"]
    res = {"mlm_loss": s["mlm_loss"] / n, "mlm_accuracy": 100 * s["mlm_correct"] / n, "masked_tokens": n}
    if s["pairs"]:
        res.update(
            nsp_loss=s["nsp_loss"] / s["pairs"], nsp_accuracy=100 * s["nsp_correct"] / s["pairs"], eval_pairs=s["pairs"]
        )
    if freq:
        res.update(unigram_baseline_loss=s["uni_loss"] / n, unigram_baseline_accuracy=100 * s["uni_correct"] / n)
    return res


class _Curve:
    """Held-out MLM loss at ``points`` evenly spaced updates (and before the first), written to ``path`` as it
    grows; global update numbers continue those of the run this one resumes (``offset``)."""

    def __init__(self, path: str, every: int, offset: int, eval_fn, info: dict):
        self.path, self.every, self.offset, self.eval_fn = path, every, offset, eval_fn
        self.data = dict(info, eval=[], train=[])

    def add(self, step: int, model) -> Dict[str, float]:
        res = self.eval_fn(model)
        point = {"update": self.offset + step, "mlm_loss": round(res["mlm_loss"], 5)}
        if "nsp_loss" in res:
            point["nsp_loss"] = round(res["nsp_loss"], 5)
        if not self.data["eval"] or self.data["eval"][-1]["update"] != point["update"]:
            self.data["eval"].append(point)
        return res

    def write(self, log_history=()) -> None:
        self.data["train"] = [
            {"update": self.offset + h["step"], "loss": h["loss"]} for h in log_history if "loss" in h and "step" in h
        ]
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(self.path + ".tmp", self.path)

    def callback(self):
        from transformers import TrainerCallback

        curve = self

        class CurveCallback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step % curve.every == 0 and state.global_step < state.max_steps:
                    curve.add(state.global_step, model)
                    curve.write(state.log_history)

        return CurveCallback()


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    n1, n2 = NVIDIA_PHASES[1], NVIDIA_PHASES[2]
    p = argparse.ArgumentParser(prog="recipes/bert/pretrain.sh", description=__doc__.splitlines()[0])
    p.add_argument("optimizer", choices=OPTIMIZERS)
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="mlm-nsp",
        help="mlm-nsp: masked LM + next-sentence prediction on sentence pairs (NVIDIA's); mlm: masked LM "
        "on full blocks",
    )
    p.add_argument(
        "--phase",
        type=int,
        choices=PHASES,
        default=1,
        help=f"1: sequence length {n1['seq_len']}; 2: length {n2['seq_len']}, resuming phase 1 (--resume)",
    )
    p.add_argument("--resume", help="phase 2: the phase-1 run's --out directory (model, optimizer state, corpus)")
    p.add_argument(
        "--reset-optimizer-step",
        action="store_true",
        help="phase 2: restart LAMB's step count at 0 (bias correction anew) as NVIDIA's script does; "
        "default: it continues",
    )
    p.add_argument("--head-dim", help="full (default), half, or an integer per-head dimension (phase 1)")
    p.add_argument(
        "--corpus",
        nargs="+",
        help="text files: one sentence per line, a blank line between documents (phase 2 default: phase 1's)",
    )
    p.add_argument("--dataset", help="HuggingFace dataset name (online), e.g. wikitext; one row = one document")
    p.add_argument("--dataset-config", default="", help="e.g. wikitext-103-raw-v1")
    p.add_argument("--text-column", default="text")
    p.add_argument("--max-lines", type=int, default=0, help="read at most N rows of a --dataset (0: all)")
    p.add_argument(
        "--tokenizer",
        help="default bert-base-uncased's vocabulary (offline: the MiniLM package's); "
        "smoke: a 1000-piece WordPiece vocabulary of the corpus; phase 2: phase 1's",
    )
    p.add_argument("--init", help="phase 1: start from this HF model (default: a fresh BERT)")
    p.add_argument("--layers", type=int, help="default 12 (BERT-Base; NVIDIA's BERT-Large: 24); smoke 2")
    p.add_argument("--hidden", type=int, help="default 768 (BERT-Large: 1024); smoke 128")
    p.add_argument("--heads", type=int, help="default 12 (BERT-Large: 16); smoke 4")
    p.add_argument("--seq-len", type=int, help=f"default {n1['seq_len']} (phase 2: {n2['seq_len']})")
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"sequences per micro-batch on the device; default {n1['micro_batch']} (phase 2: {n2['micro_batch']})",
    )
    p.add_argument(
        "--grad-accum",
        type=int,
        help=f"micro-batches per update; default {n1['global_batch'] // n1['micro_batch']} (phase 2: "
        f"{n2['global_batch'] // n2['micro_batch']}): NVIDIA's global batch of {n1['global_batch']} "
        f"({n2['global_batch']}) sequences",
    )
    p.add_argument("--max-steps", type=int, help=f"updates; default {n1['steps']} (phase 2: {n2['steps']})")
    p.add_argument("--lr", type=float, help=f"peak learning rate; default {n1['lr']} (phase 2: {n2['lr']})")
    p.add_argument(
        "--warmup-proportion",
        type=float,
        help=f"fraction of the updates in linear warmup; default {n1['warmup']} (phase 2: {n2['warmup']})",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        help=f"weight decay (every optimizer; default {NVIDIA_LAMB['weight_decay']}; phase 2: phase 1's)",
    )
    p.add_argument(
        "--fd-ov",
        type=float,
        help=f"FD coefficient of the OV forms for lamb-fd and flambe (default {FD_DEFAULT}; phase 2: phase 1's)",
    )
    p.add_argument(
        "--mha-si",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="balance every head's QK and OV factors by per-head SI at full head dim (default: for flambe)",
    )
    p.add_argument("--mlm-prob", type=float, default=0.15)
    p.add_argument(
        "--eval-tokens",
        type=int,
        help="hold out the last documents holding this many tokens (default 131072; smoke 4096)",
    )
    p.add_argument(
        "--curve-points",
        type=int,
        help="held-out evaluations during the run, for loss_curve.json (default 20; smoke 10)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="generated corpus, its own 1000-piece vocabulary, a 2-layer 128-wide BERT without dropout, "
        "300 updates in phase 1 and 100 in phase 2",
    )
    return p


def _default(value, default):
    return default if value is None else value


def _head_dim(label: str, full: int) -> Optional[int]:
    if label == "full":
        return None
    if label == "half":
        return max(1, full // 2)
    try:
        d = int(label)
    except ValueError:
        raise RecipeError(f"--head-dim must be full, half or an integer, got {label!r}") from None
    if not 1 <= d <= full:
        raise RecipeError(f"--head-dim {d} must be between 1 and the model's head dim {full}")
    return None if d == full else d


def _read_hf_dataset(name: str, config: str, column: str, limit: int) -> List[List[str]]:
    from .bert_data import split_sentences

    try:
        import datasets
    except ImportError:
        raise RecipeError(
            "--dataset needs the 'datasets' package: pip install datasets (or give --corpus FILES)"
        ) from None
    ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    docs = []
    for row in ds:
        if column not in row:
            raise RecipeError(f"dataset {name} has no column {column!r} (columns: {sorted(row)}): pass --text-column")
        sents = split_sentences(row[column] or "")
        if sents:
            docs.append(sents)
        if limit and len(docs) >= limit:
            break
    return docs


def smoke_vocabulary(docs: List[List[str]], out_dir: str, vocab_size: int) -> str:
    """A small uncased WordPiece vocabulary of the corpus, the same on every run (smoke runs: a 30k-word softmax
    would dominate): the special tokens, every character alone and as a ``##`` suffix piece, then the most
    frequent words (ties in alphabetical order) up to ``vocab_size`` entries."""
    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizerFast

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for d in docs for s in d for w, _ in pre.pre_tokenize_str(norm.normalize_str(s)))
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    known = set(vocab)
    vocab += [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if w not in known]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab[:vocab_size]) + "\n")
    BertTokenizerFast(os.path.join(out_dir, "vocab.txt"), do_lower_case=True).save_pretrained(out_dir)
    return out_dir


def write_smoke_corpus(path: str, paragraphs: int = 1500, seed: int = 7) -> str:
    """Generated English paragraphs in the corpus format: one sentence per line, a blank line between documents."""
    from .bert_data import split_sentences
    from .synthetic import squad_examples

    data = squad_examples(paragraphs, seed=seed)["data"][0]["paragraphs"]
    with open(path + ".tmp", "w") as f:
        f.write("\n\n".join("\n".join(split_sentences(p["context"])) for p in data) + "\n")
    os.replace(path + ".tmp", path)
    return path


def _load_phase1(path: str) -> dict:
    res_path = os.path.join(path, RESULTS)
    if not os.path.isfile(res_path):
        raise RecipeError(f"--resume {path}: no {RESULTS} there; give the --out directory of a finished phase-1 run")
    with open(res_path) as f:
        prev = json.load(f)
    if prev.get("phase") != 1:
        raise RecipeError(f"--resume {path}: that run is phase {prev.get('phase')}, not phase 1")
    for name in ("model", "optimizer.pt"):
        if not os.path.exists(os.path.join(path, name)):
            raise RecipeError(f"--resume {path}: {name} is missing; rerun phase 1")
    return prev


def _check_same(args, prev: dict, path: str) -> None:
    for key, flag in (("optimizer", "the optimizer"), ("objective", "--objective")):
        if getattr(args, key) != prev[key]:
            raise RecipeError(
                f"--resume {path} was pretrained with {flag} {prev[key]}, not {getattr(args, key)}: "
                f"phase 2 continues phase 1 with the same {flag}"
            )
    if args.head_dim is not None and args.head_dim != prev["head_dim_label"]:
        raise RecipeError(
            f"--resume {path} has head dim {prev['head_dim_label']}: drop --head-dim {args.head_dim} "
            "(phase 2 keeps phase 1's model)"
        )


def run(args) -> dict:
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForMaskedLM,
        BertForPreTraining,
        DataCollatorForLanguageModeling,
        TrainingArguments,
    )

    from ..hf import FNLConfig, from_pretrained, patch_model
    from .schedule import check_schedule, poly_warmup_scheduler

    s = args.smoke
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    result_path = os.path.join(out, RESULTS)
    if os.path.exists(result_path):
        os.remove(result_path)  # never leave an old result beside a new run
    settings = vars(args).copy()
    ph = phase_settings(args.phase, s)
    prev = None
    if args.phase == 2:
        if not args.resume:
            raise RecipeError("--phase 2 needs --resume PHASE1_OUT (the --out directory of the phase-1 run)")
        if args.init:
            raise RecipeError("--init is for phase 1; phase 2 starts from --resume")
        prev = _load_phase1(args.resume)
        _check_same(args, prev, args.resume)
    elif args.resume or args.reset_optimizer_step:
        raise RecipeError("--resume and --reset-optimizer-step are for --phase 2")
    seq_len = _default(args.seq_len, ph["seq_len"])
    steps = _default(args.max_steps, ph["steps"])
    warmup = _default(args.warmup_proportion, ph["warmup"])
    lr = _default(args.lr, ph["lr"])
    try:
        check_schedule(steps, warmup)
    except ValueError as e:
        raise RecipeError(f"{e} (--max-steps, --warmup-proportion)") from None
    points = _default(args.curve_points, 10 if s else 20)
    if points < 1:
        raise RecipeError(f"--curve-points must be at least 1, got {points}")
    weight_decay = _default(args.weight_decay, prev["weight_decay"] if prev else NVIDIA_LAMB["weight_decay"])
    fd_ov = 0.0 if args.optimizer == "lamb" else _default(args.fd_ov, prev["fd_ov"] if prev else FD_DEFAULT)
    if args.optimizer != "lamb" and not fd_ov > 0:
        raise RecipeError(f"{args.optimizer} needs --fd-ov > 0 (use lamb for no FD), got {fd_ov}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise RecipeError(f"--weight-decay must be a number >= 0 (0: no decay), got {weight_decay}")
    if not (math.isfinite(fd_ov) and lr > 0 and math.isfinite(lr)):
        raise RecipeError(f"--fd-ov and --lr must be finite, and --lr > 0 (got --fd-ov {fd_ov}, --lr {lr})")
    if not 0 < args.mlm_prob < 1:
        raise RecipeError(f"--mlm-prob is the share of masked tokens, in (0, 1); got {args.mlm_prob}")

    # ---- corpus, tokenizer
    if args.corpus and args.dataset:
        raise RecipeError("give --corpus FILES or --dataset NAME, not both")
    source = {
        "corpus": args.corpus,
        "dataset": args.dataset,
        "dataset_config": args.dataset_config,
        "text_column": args.text_column,
        "max_lines": args.max_lines,
    }
    if prev and not (args.corpus or args.dataset):
        source = prev["source"]
    elif s and not (args.corpus or args.dataset):
        source["corpus"] = [write_smoke_corpus(os.path.join(out, "smoke_corpus.txt"))]
    if source["corpus"]:
        source["corpus"] = [os.path.abspath(p) for p in source["corpus"]]
        docs_text = read_documents(source["corpus"])
    elif source["dataset"]:
        docs_text = _read_hf_dataset(
            source["dataset"], source["dataset_config"], source["text_column"], source["max_lines"]
        )
    else:
        raise RecipeError(
            "give --corpus FILES (one sentence per line, blank lines between documents), "
            "--dataset NAME (online), or --smoke"
        )
    if prev:
        if args.tokenizer:
            raise RecipeError("phase 2 uses phase 1's tokenizer: drop --tokenizer")
        tok_path = prev["model_dir"]
    else:
        tok_path = args.tokenizer or args.init
        if tok_path is None and s:
            tok_path = smoke_vocabulary(docs_text, os.path.join(out, "smoke_tokenizer"), vocab_size=1000)
        elif tok_path is None:
            try:
                tok_path = minilm_path()  # bert-base-uncased's WordPiece vocabulary, available offline
            except RecipeError:
                tok_path = "bert-base-uncased"
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    docs = tokenize_documents(tokenizer, docs_text)
    eval_tokens = _default(args.eval_tokens, 4096 if s else 131072)
    train_docs, eval_docs = held_out_split(docs, eval_tokens)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    train_rows = build_rows(args.objective, train_docs, seq_len, cls_id, sep_id, seed=args.seed)
    eval_rows = build_rows(args.objective, eval_docs, seq_len, cls_id, sep_id, seed=PAIRS_SEED)
    if not train_rows or not eval_rows:
        raise RecipeError(
            f"the corpus gives {len(train_rows)} training and {len(eval_rows)} held-out sequences of "
            f"{seq_len} tokens: give more text, a smaller --seq-len or a smaller --eval-tokens"
        )

    # ---- model
    torch.manual_seed(args.seed)
    cls = BertForPreTraining if args.objective == "mlm-nsp" else BertForMaskedLM
    mha_si = _default(args.mha_si, args.optimizer == "flambe")
    si_fields = mha_spectral_init_fields() if mha_si else {}
    if prev:
        model = from_pretrained(prev["model_dir"])
        head_label, head_dim, full_hd = prev["head_dim_label"], prev["head_dim"], prev["full_head_dim"]
        mha_si, rebalanced = prev["mha_si"], prev["mha_si_full_dim"]
    else:
        if args.init:
            model = cls.from_pretrained(args.init)
        else:
            hidden, heads = _default(args.hidden, 128 if s else 768), _default(args.heads, 4 if s else 12)
            if hidden % heads:
                raise RecipeError(f"--hidden {hidden} is not divisible by --heads {heads}")
            config = BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                num_attention_heads=heads,
                num_hidden_layers=_default(args.layers, 2 if s else 12),
                intermediate_size=4 * hidden,
                max_position_embeddings=max(512, seq_len),
                pad_token_id=tokenizer.pad_token_id,
                hidden_dropout_prob=0.0 if s else 0.1,
                attention_probs_dropout_prob=0.0 if s else 0.1,
            )
            model = cls(config)
        full_hd = model.config.hidden_size // model.config.num_attention_heads
        head_label = args.head_dim or "full"
        reduced = _head_dim(head_label, full_hd)
        head_dim = reduced or full_hd
        if mha_si and not si_fields:
            print(
                "note: FNLConfig has no spectral_init_qk/spectral_init_ov here: heads are balanced by per-head SI "
                "only where they shrink",
                file=sys.stderr,
            )
        rebalanced = bool(si_fields)
        # registers the QK/OV forms; shrinks the heads by per-head SI when asked; re-balances them with si_fields
        model = patch_model(
            model, FNLConfig(head_dim=reduced, fd_ov=fd_ov, fd_mode=fd_mode(args.optimizer), **si_fields)
        )
    if seq_len > model.config.max_position_embeddings:
        raise RecipeError(f"--seq-len {seq_len} exceeds the model's {model.config.max_position_embeddings} positions")

    # ---- optimizer, schedule, trainer
    opt = build_optimizer(model, args.optimizer, lr, weight_decay, fd_ov)
    step_before = 0
    if prev:
        state = torch.load(os.path.join(prev["out"], "optimizer.pt"), map_location="cpu", weights_only=True)
        opt.load_state_dict(state)
        for g in opt.param_groups:
            g["lr"] = lr  # the phase-2 rate (the schedule scales it)
        step_before = max((st["step"] for st in opt.state.values()), default=0)
        if args.reset_optimizer_step:
            for st in opt.state.values():
                st["step"] = 0
    scheduler = poly_warmup_scheduler(opt, steps, warmup)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=args.mlm_prob)
    freq = Counter(
        t for r in train_rows for t in r["input_ids"] if t not in (cls_id, sep_id)
    )  # the no-context baseline: train-set token frequencies
    use_cpu = not torch.cuda.is_available()
    offset = prev["total_updates"] if prev else 0
    eval_fn = lambda m: evaluate(m, eval_rows, collator, args.objective)  # noqa: E731
    curve = _Curve(
        os.path.join(out, "loss_curve.json"),
        max(1, steps // points),
        offset,
        eval_fn,
        {
            "phase": args.phase,
            "optimizer": args.optimizer,
            "head_dim_label": head_label,
            "objective": args.objective,
            "seq_len": seq_len,
            "phase_start": offset,
        },
    )
    targs = TrainingArguments(
        output_dir=os.path.join(out, "trainer"),
        per_device_train_batch_size=_default(args.batch_size, ph["micro_batch"]),
        gradient_accumulation_steps=_default(args.grad_accum, ph["grad_accum"]),
        max_steps=steps,
        learning_rate=lr,
        max_grad_norm=NVIDIA_LAMB["max_grad_norm"],
        logging_steps=max(1, min(25, steps // 10)),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        bf16=args.bf16,
        dataloader_num_workers=0,
        use_cpu=use_cpu,
        disable_tqdm=False,
    )
    trainer = make_trainer(
        model, args.optimizer, fd_ov, opt, scheduler, targs, Rows(train_rows), collator, callbacks=[curve.callback()]
    )
    model.to(trainer.args.device)
    curve.add(0, model)
    t0 = time.time()
    trainer.train()
    train_time = time.time() - t0

    model = trainer.model
    res = evaluate(model, eval_rows, collator, args.objective, freq, len(tokenizer))
    curve.add(trainer.state.global_step, model)
    curve.write(trainer.state.log_history)
    model_dir = os.path.join(out, "model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    torch.save(opt.state_dict(), os.path.join(out, "optimizer.pt"))
    updates = trainer.state.global_step
    result = {"recipe": "bert-mlm", "metric": "mlm_loss", "score": round(res["mlm_loss"], 4)}
    result.update({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()})
    result.update(
        {
            "variant": f"{args.optimizer}-{head_label}",
            "optimizer": args.optimizer,
            "objective": args.objective,
            "phase": args.phase,
            "head_dim": head_dim,
            "head_dim_label": head_label,
            "full_head_dim": full_hd,
            "regularizer": {
                "lamb": "weight_decay",
                "lamb-fd": "fd_ov_in_loss+weight_decay",
                "flambe": "decoupled_fd_ov+weight_decay",
            }[args.optimizer],
            "coef": weight_decay if args.optimizer == "lamb" else fd_ov,
            "weight_decay": weight_decay,
            "fd_ov": fd_ov,
            "mha_si": mha_si,
            "mha_si_full_dim": rebalanced,
            "seed": args.seed,
            "updates": updates,
            "total_updates": offset + updates,
            "optimizer_steps": max((st["step"] for st in opt.state.values()), default=0),
            "optimizer_steps_before": step_before,
            "lr": lr,
            "warmup_proportion": warmup,
            "seq_len": seq_len,
            "micro_batch": targs.per_device_train_batch_size,
            "grad_accum": targs.gradient_accumulation_steps,
            "train_sequences": len(train_rows),
            "eval_sequences": len(eval_rows),
            "smoke": s,
            "train_seconds": round(train_time, 1),
            "model_dir": model_dir,
            "out": out,
            "source": source,
            "resumed_from": os.path.abspath(args.resume) if prev else None,
            "loss_curve": os.path.join(out, "loss_curve.json"),
            "run": os.path.basename(out),
            "args": settings,
        }
    )
    result.update(count_params(model))
    with open(result_path + ".tmp", "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    os.replace(result_path + ".tmp", result_path)
    nsp = f", NSP {res['nsp_accuracy']:.1f}% of {res['eval_pairs']} pairs" if "nsp_loss" in res else ""
    print(
        f"held-out MLM loss {res['mlm_loss']:.4f}, masked-token accuracy {res['mlm_accuracy']:.2f}%{nsp} "
        f"(no-context unigram baseline: {res['unigram_baseline_loss']:.4f}, "
        f"{res['unigram_baseline_accuracy']:.2f}%; untrained: ln V = {math.log(len(tokenizer)):.2f}) "
        f"({result['params']:,} parameters, phase {args.phase}, {updates} updates, {args.optimizer}, head dim "
        f"{head_dim})"
    )
    print(f"model: {model_dir}\nresults: {result_path}")
    return result


def main(argv=None) -> int:
    return run_cli(run, build_parser().parse_args(argv), "pretrain", (RecipeError, DataError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
