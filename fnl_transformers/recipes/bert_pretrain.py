"""Masked-LM pretraining of BERT with ``Lamb`` vs ``FLAMBe`` for ``recipes/bert/pretrain.sh``.

The paper's comparison (Khodak et al., ICLR 2021, Sec. 6): LAMB with weight decay on every weight, against
FLAMBe, i.e. LAMB with decoupled Frobenius decay on the attention OV forms ``W_o,h W_v,h`` (coefficient
``--fd-ov``) and the same regular decay everywhere else (biases and LayerNorms undecayed in both); each with the
full per-head dimension or half of it (the heads of the freshly initialized model reduced by per-head SI,
:func:`fnl_transformers.hf.patch_model` with ``FNLConfig(head_dim=...)``).

Data: text files (one document or sentence per line; blank lines skipped) or a HuggingFace dataset (online),
tokenized, concatenated and cut into ``--seq-len`` blocks; ``--eval-blocks`` blocks are held out. Masking is
BERT's (15%: 80% [MASK], 10% random, 10% kept). After training: the held-out MLM loss and masked-token
accuracy with a fixed masking seed, the model (``save_pretrained``: loadable with
``fnl_transformers.hf.from_pretrained`` and by ``recipes/bert/squad.sh --model``) and ``mlm.eval.results.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List

from . import run_cli
from .squad import RecipeError, count_params, minilm_path


def read_corpus(paths: List[str]) -> List[str]:
    lines = []
    for path in paths:
        if not os.path.isfile(path):
            raise RecipeError(f"corpus file not found: {path} (give text files, one document or sentence per line)")
        with open(path, encoding="utf-8") as f:
            got = [line.strip() for line in f if line.strip()]
        if not got:
            raise RecipeError(f"corpus file {path} is empty")
        lines += got
    return lines


def read_hf_dataset(name: str, config: str, column: str, limit: int) -> List[str]:
    try:
        import datasets
    except ImportError:
        raise RecipeError("--dataset needs the 'datasets' package: pip install datasets (or give --corpus FILES)") \
            from None
    ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    out = []
    for row in ds:
        if column not in row:
            raise RecipeError(f"dataset {name} has no column {column!r} (columns: {sorted(row)}): pass --text-column")
        text = (row[column] or "").strip()
        if text:
            out.append(text)
        if limit and len(out) >= limit:
            break
    return out


def train_wordpiece(lines: List[str], out_dir: str, vocab_size: int) -> str:
    """A small uncased WordPiece vocabulary trained on ``lines`` (smoke runs: a 30k-word softmax would dominate)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    tk = BertWordPieceTokenizer(lowercase=True)
    tk.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2, show_progress=False,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    os.makedirs(out_dir, exist_ok=True)
    tk.save_model(out_dir)
    BertTokenizer.from_pretrained(out_dir).save_pretrained(out_dir)  # reads vocab.txt
    return out_dir


def blocks(tokenizer, lines: List[str], seq_len: int) -> List[List[int]]:
    """Token ids of all lines, concatenated ([SEP] between lines) and cut into [CLS] ... [SEP] blocks."""
    from tqdm import tqdm

    body = seq_len - 2
    ids: List[int] = []
    out = []
    for i in tqdm(range(0, len(lines), 1000), desc="tokenize", unit="k lines", disable=None, leave=False):
        for seq in tokenizer(lines[i:i + 1000], add_special_tokens=False)["input_ids"]:
            ids += seq + [tokenizer.sep_token_id]
        while len(ids) >= body:
            out.append([tokenizer.cls_token_id] + ids[:body] + [tokenizer.sep_token_id])
            ids = ids[body:]
    return out


class _Blocks:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recipes/bert/pretrain.sh", description=__doc__.splitlines()[0])
    p.add_argument("optimizer", choices=("lamb", "flambe"))
    p.add_argument("--head-dim", default="full", help="full, half, or an integer per-head dimension")
    p.add_argument("--corpus", nargs="+", help="text files")
    p.add_argument("--dataset", help="HuggingFace dataset name (online), e.g. wikitext")
    p.add_argument("--dataset-config", default="", help="e.g. wikitext-103-raw-v1")
    p.add_argument("--text-column", default="text")
    p.add_argument("--max-lines", type=int, default=0, help="read at most N lines of a --dataset (0: all)")
    p.add_argument("--tokenizer", help="default bert-base-uncased's vocabulary (offline: the MiniLM package's); "
                                       "smoke: a 1000-piece WordPiece vocabulary trained on the corpus")
    p.add_argument("--init", help="continue from this HF model (default: a fresh BERT)")
    p.add_argument("--layers", type=int, help="default 12 (BERT-Base); smoke 2")
    p.add_argument("--hidden", type=int, help="default 768; smoke 128")
    p.add_argument("--heads", type=int, help="default 12; smoke 4")
    p.add_argument("--seq-len", type=int, help="default 128; smoke 64")
    p.add_argument("--batch-size", type=int, help="per device; default 64 (smoke 32)")
    p.add_argument("--grad-accum", type=int, help="default 4 (smoke 1)")
    p.add_argument("--max-steps", type=int, help="default 100000 (smoke 300)")
    p.add_argument("--lr", type=float, help="default 1e-3 (smoke 1e-2)")
    p.add_argument("--warmup-ratio", type=float, help="fraction of updates in linear warmup (default 0.01; smoke 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="regular decay (both optimizers)")
    p.add_argument("--fd-ov", type=float, default=0.01, help="FLAMBe's decoupled FD of the OV forms")
    p.add_argument("--mlm-prob", type=float, default=0.15)
    p.add_argument("--eval-blocks", type=int, help="held-out blocks (default 1000; smoke 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true",
                   help="generated corpus, its own 1000-piece vocabulary, a 2-layer 128-wide BERT without dropout, "
                        "300 updates (~30 s on one CPU core)")
    return p


def _default(value, full, smoke, is_smoke):
    return value if value is not None else (smoke if is_smoke else full)


def run(args) -> dict:
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        TrainingArguments,
    )

    from ..hf import FNLConfig, FNLTrainer, patch_model
    from ..optim import FLAMBe, Lamb, param_groups

    s = args.smoke
    out = args.out
    os.makedirs(out, exist_ok=True)
    result_path = os.path.join(out, "mlm.eval.results.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    seq_len = _default(args.seq_len, 128, 64, s)
    if args.corpus and args.dataset:
        raise RecipeError("give --corpus FILES or --dataset NAME, not both")
    if s and not (args.corpus or args.dataset):
        from .synthetic import squad_examples

        data = squad_examples(1500, seed=7)["data"][0]["paragraphs"]
        path = os.path.join(out, "smoke_corpus.txt")
        with open(path, "w") as f:
            f.writelines(p["context"] + "\n" for p in data)
        args.corpus = [path]
    if args.corpus:
        lines = read_corpus(args.corpus)
    elif args.dataset:
        lines = read_hf_dataset(args.dataset, args.dataset_config, args.text_column, args.max_lines)
    else:
        raise RecipeError("give --corpus FILES (text, one document per line), --dataset NAME (online), or --smoke")

    tok_path = args.tokenizer or (args.init if args.init else None)
    if tok_path is None and s:
        tok_path = train_wordpiece(lines, os.path.join(out, "smoke_tokenizer"), vocab_size=1000)
    elif tok_path is None:
        try:
            tok_path = minilm_path()  # bert-base-uncased's WordPiece vocabulary, available offline
        except RecipeError:
            tok_path = "bert-base-uncased"
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    rows = blocks(tokenizer, lines, seq_len)
    n_eval = _default(args.eval_blocks, 1000, 64, s)
    if len(rows) <= n_eval:
        raise RecipeError(f"the corpus gives {len(rows)} blocks of {seq_len} tokens, not more than the {n_eval} "
                          "held-out blocks: give more text or a smaller --eval-blocks")
    train_rows, eval_rows = rows[:-n_eval], rows[-n_eval:]

    torch.manual_seed(args.seed)
    if args.init:
        model = BertForMaskedLM.from_pretrained(args.init)
    else:
        hidden, heads = _default(args.hidden, 768, 128, s), _default(args.heads, 12, 4, s)
        if hidden % heads:
            raise RecipeError(f"--hidden {hidden} is not divisible by --heads {heads}")
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_attention_heads=heads,
                            num_hidden_layers=_default(args.layers, 12, 2, s), intermediate_size=4 * hidden,
                            max_position_embeddings=max(512, seq_len), pad_token_id=tokenizer.pad_token_id,
                            hidden_dropout_prob=0.0 if s else 0.1, attention_probs_dropout_prob=0.0 if s else 0.1)
        model = BertForMaskedLM(config)
    full_hd = model.config.hidden_size // model.config.num_attention_heads
    if args.head_dim == "full":
        head_dim = None
    elif args.head_dim == "half":
        head_dim = max(1, full_hd // 2)
    else:
        try:
            head_dim = int(args.head_dim)
        except ValueError:
            raise RecipeError(f"--head-dim must be full, half or an integer, got {args.head_dim!r}") from None
        if not 1 <= head_dim <= full_hd:
            raise RecipeError(f"--head-dim {head_dim} must be between 1 and the model's head dim {full_hd}")
    fd_ov = args.fd_ov if args.optimizer == "flambe" else 0.0
    fnl = FNLConfig(head_dim=head_dim, fd_ov=fd_ov, fd_mode="decoupled")
    model = patch_model(model, fnl)  # registers the QK/OV forms; reduces the heads by per-head SI when asked

    lr = _default(args.lr, 1e-3, 1e-2, s)
    groups = param_groups(model, fd_ov=fd_ov, weight_decay=args.weight_decay)
    opt = (FLAMBe if args.optimizer == "flambe" else Lamb)(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=args.mlm_prob)
    use_cpu = not torch.cuda.is_available()
    targs = TrainingArguments(
        output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=_default(args.batch_size, 64, 32, s),
        gradient_accumulation_steps=_default(args.grad_accum, 4, 1, s),
        max_steps=_default(args.max_steps, 100000, 300, s),
        learning_rate=lr, warmup_steps=_default(args.warmup_ratio, 0.01, 0.1, s), lr_scheduler_type="linear",
        logging_steps=25 if s else 200, save_strategy="no" if s else "steps", save_steps=5000, save_total_limit=2,
        report_to=[], seed=args.seed, bf16=args.bf16, dataloader_num_workers=0, use_cpu=use_cpu, disable_tqdm=False)
    trainer = FNLTrainer(model=model, args=targs, train_dataset=_Blocks(train_rows), data_collator=collator,
                         fnl_config=fnl, fd="decoupled" if fd_ov else "coupled", optimizers=(opt, None))
    t0 = time.time()
    trainer.train()
    train_time = time.time() - t0

    # held-out MLM loss / accuracy with a fixed masking
    model = trainer.model.eval()
    device = next(model.parameters()).device
    torch_state = torch.get_rng_state()
    torch.manual_seed(1234)
    import math
    from collections import Counter

    freq = Counter(t for r in train_rows for t in r[1:-1])  # the no-context baseline: train-set token frequencies
    total = sum(freq.values())
    top = freq.most_common(1)[0][0]
    loss_sum = correct = count = uni_loss = uni_correct = 0.0
    with torch.no_grad():
        for i in range(0, len(eval_rows), 32):
            batch = collator([{"input_ids": r} for r in eval_rows[i:i + 32]])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"]).logits
            mask = batch["labels"] != -100
            loss_sum += torch.nn.functional.cross_entropy(logits[mask].float(), batch["labels"][mask],
                                                          reduction="sum").item()
            correct += (logits[mask].argmax(-1) == batch["labels"][mask]).sum().item()
            count += mask.sum().item()
            for t in batch["labels"][mask].tolist():
                uni_loss -= math.log((freq.get(t, 0) + 1) / (total + len(tokenizer)))  # add-one smoothing
                uni_correct += t == top
    torch.set_rng_state(torch_state)
    if count == 0:
        raise RecipeError("no token of the held-out blocks was masked (is the tokenizer mapping everything to "
                          "[UNK]?): check --tokenizer against the corpus")
    eval_loss = loss_sum / count
    model.save_pretrained(os.path.join(out, "model"))
    tokenizer.save_pretrained(os.path.join(out, "model"))
    name = os.path.basename(os.path.normpath(out))
    result = {"recipe": "bert-mlm", "metric": "mlm_loss", "score": round(eval_loss, 4), "mlm_loss": round(eval_loss, 4),
              "mlm_accuracy": round(100 * correct / count, 2), "masked_tokens": int(count),
              "unigram_baseline_loss": round(uni_loss / count, 4),
              "unigram_baseline_accuracy": round(100 * uni_correct / count, 2),
              "variant": f"{args.optimizer}-{args.head_dim}", "optimizer": args.optimizer,
              "head_dim": head_dim or full_hd, "regularizer": "fd_ov+weight_decay" if fd_ov else "weight_decay",
              "coef": fd_ov if fd_ov else args.weight_decay, "weight_decay": args.weight_decay, "fd_ov": fd_ov,
              "updates": trainer.state.global_step, "lr": lr, "seq_len": seq_len, "train_blocks": len(train_rows),
              "eval_blocks": len(eval_rows), "smoke": s, "train_seconds": round(train_time, 1),
              "model_dir": os.path.abspath(os.path.join(out, "model")), "run": name}
    result.update(count_params(model))
    with open(result_path + ".tmp", "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    os.replace(result_path + ".tmp", result_path)
    print(f"MLM held-out loss {eval_loss:.4f}, masked-token accuracy {result['mlm_accuracy']:.2f}% (no-context "
          f"unigram baseline: {result['unigram_baseline_loss']:.4f}, {result['unigram_baseline_accuracy']:.2f}%; "
          f"untrained: ln V = {math.log(len(tokenizer)):.2f}) "
          f"({result['params']:,} parameters, {result['updates']} updates, {args.optimizer}, head dim "
          f"{result['head_dim']})")
    print(f"model: {result['model_dir']}\nresults: {result_path}")
    return result


def main(argv=None) -> int:
    return run_cli(run, build_parser().parse_args(argv), "pretrain", (RecipeError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
