"""Parallel-text preparation for ``recipes/iwslt14/prepare.sh``: checks, cleaning, joint sentencepiece.

Subcommands (``python -m fnl_transformers.recipes.textprep CMD --help``):

- ``check RAW_DIR --src de --tgt en``: the raw layout is ``{train,valid,test}.{src,tgt}``, one sentence per
  line, line-aligned. A missing file, an empty file or mismatched line counts is one error line (exit 2).
- ``clean RAW_DIR OUT_DIR``: Unicode NFC, control characters removed, whitespace collapsed. Train and valid pairs
  are dropped when a side is empty, longer than ``--max-len`` words, or the word-length ratio exceeds
  ``--ratio`` (the Moses ``clean-corpus-n.perl -ratio 1.5 1 175`` rule fairseq's IWSLT script uses). Test pairs
  are never dropped (an empty test line is an error), so BLEU is always over the whole test set.
  Counts of what was removed are printed.
- ``spm-train CLEAN_DIR MODEL_PREFIX --vocab-size N``: one joint sentencepiece model on train.{src,tgt}.
- ``spm-encode MODEL CLEAN_DIR OUT_DIR``: all splits to space-separated pieces (progress bar).
- ``download URL PATH``: with a progress bar; an error suggests ``--raw-dir`` when offline.
- ``extract-iwslt ORIG_DIR RAW_DIR``: the unpacked official IWSLT'14 archive (``train.tags.*``, ``IWSLT14.TED*.xml``)
  to the raw layout, with fairseq's split: every 23rd training line is valid, test = dev2010 + TEDX dev2012 +
  tst2010-2012.

Every output file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import unicodedata
from typing import Dict, List, Sequence, Tuple

SPLITS = ("train", "valid", "test")
LAYOUT_HINT = "--raw-dir needs {train,valid,test}.{SRC,TGT}: one sentence per line, the two sides line-aligned"


class PrepError(ValueError):
    """Bad input for a recipe: the message names the problem and the fix."""


def count_lines(path: str) -> int:
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            n += chunk.count(b"\n")
        if f.tell() > 0:  # a last line without a trailing newline still counts
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                n += 1
    return n


def check_raw_dir(raw_dir: str, src: str, tgt: str) -> Dict[str, int]:
    """Return {split: lines}; raise PrepError for a missing file, an empty file or mismatched line counts."""
    if src == tgt:
        raise PrepError(f"--src and --tgt are both {src!r}: give two different language suffixes")
    if not os.path.isdir(raw_dir):
        raise PrepError(f"raw directory not found: {raw_dir} ({LAYOUT_HINT})")
    counts = {}
    for split in SPLITS:
        paths = [os.path.join(raw_dir, f"{split}.{lang}") for lang in (src, tgt)]
        for path in paths:
            if not os.path.isfile(path):
                raise PrepError(f"missing file {path} ({LAYOUT_HINT.replace('SRC', src).replace('TGT', tgt)})")
        n = [count_lines(p) for p in paths]
        for path, lines in zip(paths, n):
            if lines == 0:
                raise PrepError(f"empty file {path}: each split needs at least one sentence pair")
        if n[0] != n[1]:
            raise PrepError(
                f"mismatched line counts in split {split!r}: {paths[0]} has {n[0]} lines but {paths[1]} has {n[1]};"
                " line i of one side must translate line i of the other"
            )
        counts[split] = n[0]
    return counts


_CONTROL = re.compile(r"[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u200b\ufeff]")


def normalize(line: str) -> str:
    line = unicodedata.normalize("NFC", line)
    line = _CONTROL.sub(" ", line)
    return " ".join(line.split())


def clean_split(src_lines: Sequence[str], tgt_lines: Sequence[str], max_len: int, ratio: float, keep_all: bool):
    """Return (kept pairs, {reason: count}). ``keep_all`` (test): nothing is dropped, empty lines are errors."""
    kept: List[Tuple[str, str]] = []
    removed = {"empty": 0, f"longer than {max_len} words": 0, f"length ratio above {ratio:g}": 0}
    for i, (s, t) in enumerate(zip(src_lines, tgt_lines)):
        s, t = normalize(s), normalize(t)
        ls, lt = len(s.split()), len(t.split())
        if keep_all:
            if ls == 0 or lt == 0:
                raise PrepError(f"test line {i + 1} is empty on one side: remove the pair from both test files")
            kept.append((s, t))
        elif ls == 0 or lt == 0:
            removed["empty"] += 1
        elif ls > max_len or lt > max_len:
            removed[f"longer than {max_len} words"] += 1
        elif max(ls, lt) > ratio * min(ls, lt):
            removed[f"length ratio above {ratio:g}"] += 1
        else:
            kept.append((s, t))
    return kept, removed


def _read(path: str) -> List[str]:
    with open(path, encoding="utf-8", errors="strict") as f:
        return f.read().splitlines()


def write_lines(path: str, lines) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def clean_dir(raw_dir: str, out_dir: str, src: str, tgt: str, max_len: int = 175, ratio: float = 1.5) -> Dict[str, int]:
    check_raw_dir(raw_dir, src, tgt)
    os.makedirs(out_dir, exist_ok=True)
    kept_counts = {}
    for split in SPLITS:
        try:
            s_lines = _read(os.path.join(raw_dir, f"{split}.{src}"))
            t_lines = _read(os.path.join(raw_dir, f"{split}.{tgt}"))
        except UnicodeDecodeError as exc:
            raise PrepError(
                f"{split}.{src}/{tgt} in {raw_dir} is not UTF-8 text ({exc.reason}): convert it with iconv"
            ) from None
        kept, removed = clean_split(s_lines, t_lines, max_len, ratio, keep_all=(split == "test"))
        if not kept:
            raise PrepError(
                f"no {split} pair survives cleaning (removed: {removed}); check the files or raise --max-len/--ratio"
            )
        write_lines(os.path.join(out_dir, f"{split}.{src}"), [k[0] for k in kept])
        write_lines(os.path.join(out_dir, f"{split}.{tgt}"), [k[1] for k in kept])
        dropped = ", ".join(f"{v} {k}" for k, v in removed.items() if v) or "none"
        print(f"clean {split}: kept {len(kept)} of {len(s_lines)} pairs (removed: {dropped})", flush=True)
        kept_counts[split] = len(kept)
    return kept_counts


def spm_train(
    clean_dir_: str,
    model_prefix: str,
    src: str,
    tgt: str,
    vocab_size: int,
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
) -> str:
    import sentencepiece as spm

    if vocab_size < 8:
        raise PrepError(f"--vocab-size must be at least 8, got {vocab_size}")
    inputs = [os.path.join(clean_dir_, f"train.{lang}") for lang in (src, tgt)]
    tmp_prefix = model_prefix + ".tmp"

    def train(size: int, prefix: str) -> None:
        spm.SentencePieceTrainer.train(
            input=",".join(inputs),
            model_prefix=prefix,
            vocab_size=size,
            model_type=model_type,
            character_coverage=1.0,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            unk_id=0,
            minloglevel=2,
        )

    try:
        train(vocab_size, tmp_prefix)
    except RuntimeError as exc:
        m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(exc))
        if m:
            works = _largest_trainable(train, int(m.group(2)), tmp_prefix + ".probe")
            hint = (
                f"pass --vocab-size {works} or less"
                if works
                else "no vocabulary size of at least 8 trains on it: use a larger corpus"
            )
            raise PrepError(f"--vocab-size {m.group(1)} is too large for this training corpus: {hint}") from None
        raise PrepError(f"sentencepiece training failed: {str(exc).strip().splitlines()[-1]}") from None
    for ext in ("model", "vocab"):
        os.replace(f"{tmp_prefix}.{ext}", f"{model_prefix}.{ext}")
    return model_prefix + ".model"


def _largest_trainable(train, bound: int, prefix: str) -> int:
    """The largest vocabulary size <= ``bound`` (sentencepiece's own suggestion) that really trains on the corpus,
    found by training (a tiny corpus trains in a fraction of a second); 0 if none of at least 8 does."""

    def ok(size: int) -> bool:
        try:
            train(size, prefix)
            return True
        except RuntimeError:
            return False
        finally:
            for ext in ("model", "vocab"):
                if os.path.exists(f"{prefix}.{ext}"):
                    os.remove(f"{prefix}.{ext}")

    if ok(bound):
        return bound
    if not ok(8):
        return 0
    lo, hi = 8, bound  # ok(lo), not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def spm_encode(model: str, clean_dir_: str, out_dir: str, src: str, tgt: str) -> None:
    import sentencepiece as spm
    from tqdm import tqdm

    sp = spm.SentencePieceProcessor(model_file=model)
    os.makedirs(out_dir, exist_ok=True)
    for split in SPLITS:
        for lang in (src, tgt):
            lines = _read(os.path.join(clean_dir_, f"{split}.{lang}"))
            out = []
            for i in tqdm(
                range(0, len(lines), 1000),
                desc=f"sentencepiece {split}.{lang}",
                unit="k lines",
                leave=False,
                mininterval=2,
                disable=None,
            ):
                out += [" ".join(p) for p in sp.encode(lines[i : i + 1000], out_type=str)]
            write_lines(os.path.join(out_dir, f"{split}.{lang}"), out)


# ---------------------------------------------------------------- official IWSLT'14 archive
_DROP_TAGS = (
    "<url>",
    "<talkid>",
    "<keywords>",
    "<speaker>",
    "<reviewer",
    "<translator",
    "<doc ",
    "</doc>",
    "<?xml",
    "<mteval",
    "</mteval",
    "<srcset",
    "</srcset",
    "<refset",
    "</refset",
)
_TEST_PARTS = (
    "IWSLT14.TED.dev2010",
    "IWSLT14.TEDX.dev2012",
    "IWSLT14.TED.tst2010",
    "IWSLT14.TED.tst2011",
    "IWSLT14.TED.tst2012",
)


def _train_tags(path: str) -> List[str]:
    out = []
    for line in _read(path):
        if any(tag in line for tag in ("<url>", "<talkid>", "<keywords>")):
            continue
        line = re.sub(r"</?(title|description)>", "", line)
        out.append(line.strip())
    return out


def _xml_segments(path: str) -> List[str]:
    segs = []
    for line in _read(path):
        m = re.search(r"<seg id=\"?\d+\"?>\s*(.*?)\s*</seg>", line)
        if m:
            segs.append(m.group(1).replace("\u2019", "'"))
    return segs


def extract_iwslt(orig_dir: str, raw_dir: str, src: str = "de", tgt: str = "en", pair: str = "") -> Dict[str, int]:
    pair = pair or f"{src}-{tgt}"  # the archive's name for the pair (de-en also serves en -> de)
    found = glob.glob(os.path.join(orig_dir, "**", f"train.tags.{pair}.{src}"), recursive=True)
    if not found:
        raise PrepError(
            f"train.tags.{pair}.{src} not found under {orig_dir}: is this the unpacked IWSLT'14 {pair} archive?"
        )
    base = os.path.dirname(found[0])
    train = {lang: _train_tags(os.path.join(base, f"train.tags.{pair}.{lang}")) for lang in (src, tgt)}
    if len(train[src]) != len(train[tgt]):
        raise PrepError(
            f"train.tags.{pair}: {len(train[src])} {src} lines but {len(train[tgt])} {tgt} lines after tag removal"
        )
    test = {src: [], tgt: []}
    for part in _TEST_PARTS:
        for lang in (src, tgt):
            path = os.path.join(base, f"{part}.{pair}.{lang}.xml")
            if not os.path.isfile(path):
                raise PrepError(f"missing {path}: the IWSLT'14 archive is incomplete, download it again")
            test[lang] += _xml_segments(path)
    os.makedirs(raw_dir, exist_ok=True)
    for lang in (src, tgt):
        write_lines(os.path.join(raw_dir, f"valid.{lang}"), [s for i, s in enumerate(train[lang], 1) if i % 23 == 0])
        write_lines(os.path.join(raw_dir, f"train.{lang}"), [s for i, s in enumerate(train[lang], 1) if i % 23 != 0])
        write_lines(os.path.join(raw_dir, f"test.{lang}"), test[lang])
    return check_raw_dir(raw_dir, src, tgt)


def download(url: str, path: str) -> None:
    """Download ``url`` to ``path`` with a progress bar; the file appears under its name only when complete."""
    import urllib.request

    from tqdm import tqdm

    tmp = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path), disable=None) as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise PrepError(
            f"could not download {url} ({exc}); when offline, pass --raw-dir DIR with your own corpus"
        ) from None
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fnl_transformers.recipes.textprep", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download")
    d.add_argument("url")
    d.add_argument("path")
    for name in ("check", "clean", "spm-train", "spm-encode", "extract-iwslt"):
        s = sub.add_parser(name)
        s.add_argument("--src", default="de")
        s.add_argument("--tgt", default="en")
        if name == "check":
            s.add_argument("raw_dir")
        elif name == "clean":
            s.add_argument("raw_dir")
            s.add_argument("out_dir")
            s.add_argument("--max-len", type=int, default=175)
            s.add_argument("--ratio", type=float, default=1.5)
        elif name == "spm-train":
            s.add_argument("clean_dir")
            s.add_argument("model_prefix")
            s.add_argument("--vocab-size", type=int, default=10000)
            s.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
        elif name == "spm-encode":
            s.add_argument("model")
            s.add_argument("clean_dir")
            s.add_argument("out_dir")
        else:
            s.add_argument("orig_dir")
            s.add_argument("raw_dir")
            s.add_argument("--pair", default="", help="the archive's pair name (default SRC-TGT)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "download":
            download(args.url, args.path)
        elif args.cmd == "check":
            counts = check_raw_dir(args.raw_dir, args.src, args.tgt)
            print("raw corpus ok: " + ", ".join(f"{k} {v} pairs" for k, v in counts.items()))
        elif args.cmd == "clean":
            clean_dir(args.raw_dir, args.out_dir, args.src, args.tgt, args.max_len, args.ratio)
        elif args.cmd == "spm-train":
            path = spm_train(args.clean_dir, args.model_prefix, args.src, args.tgt, args.vocab_size, args.model_type)
            print(f"sentencepiece model: {path} (vocabulary {args.vocab_size}, {args.model_type})")
        elif args.cmd == "spm-encode":
            spm_encode(args.model, args.clean_dir, args.out_dir, args.src, args.tgt)
        else:
            counts = extract_iwslt(args.orig_dir, args.raw_dir, args.src, args.tgt, args.pair)
            print("IWSLT'14 extracted: " + ", ".join(f"{k} {v} pairs" for k, v in counts.items()))
    except (PrepError, FileNotFoundError) as exc:
        print(f"{os.environ.get('FNL_PROG', 'textprep')}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
