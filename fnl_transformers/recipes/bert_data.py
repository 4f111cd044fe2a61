"""Pretraining data for ``recipes/bert/pretrain.sh``: documents of sentences, a held-out split, MLM blocks and
next-sentence-prediction pairs.

Corpus format (the one of BERT's and NVIDIA's ``create_pretraining_data.py``): plain text, one sentence per
line, a blank line between documents. A file without any blank line is read as one document per line. Every
line is also split after ``.``, ``!`` or ``?`` followed by a space and an upper-case letter, digit or quote
(:func:`split_sentences`), so paragraphs per line work too; give one sentence per line for exact control.

* :func:`held_out_split`: the last documents holding at least ``eval_tokens`` tokens are held out. The split
  depends on neither the objective nor the sequence length, so both phases of a run share it.
* :func:`mlm_blocks` (objective ``mlm``): the documents' tokens concatenated ([SEP] after each document) and
  cut into ``[CLS] ... [SEP]`` blocks of exactly ``seq_len`` tokens.
* :func:`nsp_instances` (objective ``mlm-nsp``): sentence pairs as ``create_instances_from_document`` builds
  them: each document is cut into chunks of whole sentences filling ``seq_len - 3`` tokens (a random shorter
  target with probability ``short_seq_prob``); sentence A is the chunk's first ``1..k-1`` sentences; sentence B
  is the rest of the chunk (label 0, "is next") or, with probability 1/2 and always for a one-sentence chunk,
  a run of sentences from a random other document (label 1, "random"; the unused sentences of the chunk are
  used again); the longer side is trimmed one token at a time from a random end until the pair fits.
"""

from __future__ import annotations

import os
import random
import re
from typing import Dict, List, Sequence, Tuple

Document = List[List[int]]  # token ids per sentence

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


class DataError(ValueError):
    """Bad corpus input (one line naming the problem and the fix)."""


def split_sentences(line: str) -> List[str]:
    """Sentences of one line of text (see the module docstring)."""
    return [s for s in (p.strip() for p in _SENTENCE_END.split(line.strip())) if s]


def read_documents(paths: Sequence[str]) -> List[List[str]]:
    """Documents (lists of sentences) of text files in the corpus format of the module docstring."""
    docs: List[List[str]] = []
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(
                f"corpus file not found: {path} (give text files: one sentence per line, a blank line "
                "between documents)"
            )
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        while lines and not lines[-1]:
            lines.pop()
        if not any(lines):
            raise DataError(f"corpus file {path} is empty")
        if "" in lines:  # blank lines separate documents
            current: List[str] = []
            for line in lines + [""]:
                if line:
                    current += split_sentences(line)
                elif current:
                    docs.append(current)
                    current = []
        else:  # no blank lines: one document per line
            docs += [split_sentences(line) for line in lines if line]
    return [d for d in docs if d]


def tokenize_documents(tokenizer, docs: List[List[str]]) -> List[Document]:
    """Token ids (no special tokens) of every sentence; empty sentences and documents dropped."""
    from tqdm import tqdm

    flat = [s for d in docs for s in d]
    ids: List[List[int]] = []
    for i in tqdm(range(0, len(flat), 2000), desc="tokenize", unit="k sentences", disable=None, leave=False):
        ids += tokenizer(flat[i : i + 2000], add_special_tokens=False)["input_ids"]
    out, pos = [], 0
    for d in docs:
        sents = [s for s in ids[pos : pos + len(d)] if s]
        pos += len(d)
        if sents:
            out.append(sents)
    return out


def num_tokens(doc: Document) -> int:
    return sum(len(s) for s in doc)


def held_out_split(docs: List[Document], eval_tokens: int) -> Tuple[List[Document], List[Document]]:
    """``(train, held_out)``: the held-out part is the shortest run of final documents with at least
    ``eval_tokens`` tokens; at least one document must remain for training."""
    total, k = 0, 0
    while k < len(docs) and total < eval_tokens:
        k += 1
        total += num_tokens(docs[-k])
    if total < eval_tokens or k >= len(docs):
        raise DataError(
            f"the corpus has {sum(map(num_tokens, docs))} tokens in {len(docs)} documents: too few to "
            f"hold out {eval_tokens} tokens and train on the rest; give more text or a smaller "
            "--eval-tokens"
        )
    return docs[:-k], docs[-k:]


def mlm_blocks(docs: List[Document], seq_len: int, cls_id: int, sep_id: int) -> List[Dict[str, List[int]]]:
    """``[CLS] body [SEP]`` blocks of exactly ``seq_len`` tokens over the concatenated documents ([SEP] after
    each document); a final partial block is dropped."""
    body = seq_len - 2
    stream: List[int] = []
    for d in docs:
        for s in d:
            stream += s
        stream.append(sep_id)
    return [{"input_ids": [cls_id] + stream[i : i + body] + [sep_id]} for i in range(0, len(stream) - body + 1, body)]


def truncate_pair(a: List[int], b: List[int], max_tokens: int, rng: random.Random) -> None:
    """Trim the longer of ``a``/``b`` by one token at a random end until ``len(a) + len(b) <= max_tokens``."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def nsp_instances(
    docs: List[Document], seq_len: int, rng: random.Random, short_seq_prob: float = 0.1
) -> List[Tuple[List[int], List[int], int]]:
    """``(tokens_a, tokens_b, label)`` pairs of every document (label 0: B follows A; 1: B is random), built as
    in the module docstring; ``rng`` makes them reproducible."""
    if seq_len < 8:
        raise DataError(f"--seq-len {seq_len} is too short for sentence pairs (at least 8)")
    max_tokens = seq_len - 3  # [CLS] A [SEP] B [SEP]
    out = []
    for index, doc in enumerate(docs):
        target = max_tokens
        if rng.random() < short_seq_prob:
            target = rng.randint(2, max_tokens)
        chunk: List[List[int]] = []
        length = 0
        i = 0
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if i == len(doc) - 1 or length >= target:
                a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                a = [t for s in chunk[:a_end] for t in s]
                b: List[int] = []
                if len(chunk) == 1 or rng.random() < 0.5:
                    label = 1
                    other = index
                    for _ in range(10):  # a different document (a one-document split may not have one)
                        other = rng.randint(0, len(docs) - 1)
                        if other != index:
                            break
                    if other == index:
                        label = 0
                    rand_doc = docs[other]
                    for s in rand_doc[rng.randint(0, len(rand_doc) - 1) :]:
                        b += s
                        if len(b) >= target - len(a):
                            break
                    i -= len(chunk) - a_end  # the chunk's unused sentences start the next chunk
                else:
                    label = 0
                    b = [t for s in chunk[a_end:] for t in s]
                truncate_pair(a, b, max_tokens, rng)
                out.append((a, b, label))
                chunk, length = [], 0
            i += 1
    return out


def encode_pair(a: List[int], b: List[int], label: int, cls_id: int, sep_id: int) -> Dict[str, object]:
    """``[CLS] a [SEP] b [SEP]`` with segment ids 0 / 1 and BERT's ``next_sentence_label``."""
    return {
        "input_ids": [cls_id] + a + [sep_id] + b + [sep_id],
        "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1),
        "next_sentence_label": label,
    }


class Rows:
    """A map-style dataset of feature dicts (what ``Trainer`` and the collators take)."""

    def __init__(self, rows: List[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def build_rows(objective: str, docs: List[Document], seq_len: int, cls_id: int, sep_id: int, seed: int) -> List[dict]:
    """Training or evaluation rows of one split: MLM blocks, or NSP pairs drawn with ``seed``."""
    if objective == "mlm":
        return mlm_blocks(docs, seq_len, cls_id, sep_id)
    rng = random.Random(seed)
    return [encode_pair(a, b, label, cls_id, sep_id) for a, b, label in nsp_instances(docs, seq_len, rng)]
