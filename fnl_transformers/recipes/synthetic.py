"""Learnable synthetic data for the recipes' ``--smoke`` modes (no download, deterministic in the seed).

Parallel text (``write_parallel``): a toy language pair with real structure. Sentences follow a small grammar
(``NP VERB [ADV] NP [PREP NP] .`` with ``NP = DET ADJ* NOUN``); the target side is a deterministic
word-by-word lexicon mapping (a bijection onto a different syllable inventory) plus local reordering:
adjectives follow their noun in reversed order and an adverb precedes its verb. A model that learns the
lexicon and the two reordering rules translates perfectly, an untrained one scores near zero BLEU, so the
smoke demo shows learning, not only a pipeline that runs.

Monolingual text (``write_monolingual``): source-side sentences of the same grammar, for MLM pretraining.

SQuAD v1.1 JSON (``write_squad``): English paragraphs of templated facts (who built what where, when) with
questions whose answers are exact spans (character offsets checked), for fine-tuning a real BERT model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Dict, List, Sequence, Tuple

SPLITS = ("train", "valid", "test")
# part of speech -> lexicon size
POS_SIZES = {"det": 4, "adj": 30, "noun": 60, "verb": 30, "adv": 10, "prep": 6}


def _lexicon(rng: random.Random, size: int, onsets: str, vowels: str, codas: Sequence[str], taken: set) -> List[str]:
    words = []
    while len(words) < size:
        n_syll = rng.choice((2, 2, 3))
        word = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(n_syll))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


class ToyLanguagePair:
    """Source grammar + deterministic lexicon bijection + local reordering rules (see module docstring)."""

    def __init__(self, seed: int = 0):
        rng = random.Random(seed)
        taken: set = set()
        self.src: Dict[str, List[str]] = {}
        self.tgt: Dict[str, List[str]] = {}
        for pos, size in POS_SIZES.items():  # source: open CV syllables; target: CVC syllables, other letters
            self.src[pos] = _lexicon(rng, size, "bdfgklmnprstvz", "aeiou", [""], taken)
            self.tgt[pos] = _lexicon(rng, size, "chjwxyq", "aeiouy", "nrsx", taken)
        self.rng = rng

    def _np(self, rng: random.Random) -> Tuple[List[str], List[str]]:
        det = rng.randrange(POS_SIZES["det"])
        adjs = [rng.randrange(POS_SIZES["adj"]) for _ in range(rng.choice((0, 0, 1, 1, 2)))]
        noun = rng.randrange(POS_SIZES["noun"])
        src = [self.src["det"][det]] + [self.src["adj"][a] for a in adjs] + [self.src["noun"][noun]]
        # rule 1: adjectives follow the noun, in reversed order
        tgt = [self.tgt["det"][det], self.tgt["noun"][noun]] + [self.tgt["adj"][a] for a in reversed(adjs)]
        return src, tgt

    def sentence(self, rng: random.Random) -> Tuple[str, str]:
        s1, t1 = self._np(rng)
        verb = rng.randrange(POS_SIZES["verb"])
        src, tgt = list(s1), list(t1)
        src.append(self.src["verb"][verb])
        if rng.random() < 0.4:  # rule 2: the adverb moves before the verb
            adv = rng.randrange(POS_SIZES["adv"])
            src.append(self.src["adv"][adv])
            tgt += [self.tgt["adv"][adv], self.tgt["verb"][verb]]
        else:
            tgt.append(self.tgt["verb"][verb])
        s2, t2 = self._np(rng)
        src += s2
        tgt += t2
        if rng.random() < 0.5:
            prep = rng.randrange(POS_SIZES["prep"])
            s3, t3 = self._np(rng)
            src += [self.src["prep"][prep]] + s3
            tgt += [self.tgt["prep"][prep]] + t3
        return _surface(src), _surface(tgt)


def _surface(words: Sequence[str]) -> str:
    text = " ".join(words) + "."
    return text[0].upper() + text[1:]


def write_parallel(
    out_dir: str, src: str = "de", tgt: str = "en", sizes=(12000, 400, 400), seed: int = 0
) -> Dict[str, int]:
    """Write ``{train,valid,test}.{src,tgt}`` to ``out_dir``; returns {split: lines}. Splits are disjoint."""
    pair = ToyLanguagePair(seed)
    rng = random.Random(seed + 1)
    os.makedirs(out_dir, exist_ok=True)
    seen = set()
    counts = {}
    for split, size in zip(SPLITS, sizes):
        rows = []
        while len(rows) < size:
            s, t = pair.sentence(rng)
            if s in seen:  # keep test sentences out of training
                continue
            seen.add(s)
            rows.append((s, t))
        for lang, col in ((src, 0), (tgt, 1)):
            _write_lines(os.path.join(out_dir, f"{split}.{lang}"), [r[col] for r in rows])
        counts[split] = size
    return counts


def write_monolingual(path: str, lines: int = 4000, seed: int = 0) -> int:
    """Source-side sentences of the toy grammar, one per line (an MLM corpus)."""
    pair = ToyLanguagePair(seed)
    rng = random.Random(seed + 2)
    _write_lines(path, [pair.sentence(rng)[0] for _ in range(lines)])
    return lines


def _write_lines(path: str, lines: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)  # never leave a half-written file under the final name


# ---------------------------------------------------------------- SQuAD v1.1 format
_PEOPLE = [
    "Anna Keller",
    "Omar Haddad",
    "Li Wei",
    "Maria Rossi",
    "John Carter",
    "Aiko Tanaka",
    "Pedro Alves",
    "Fatima Noor",
    "Ivan Petrov",
    "Grace Okafor",
    "Lena Berg",
    "Samuel Reyes",
    "Nadia Amari",
    "Tom Walsh",
]
_CITIES = [
    "Lisbon",
    "Nairobi",
    "Oslo",
    "Kyoto",
    "Lima",
    "Cairo",
    "Dublin",
    "Quebec",
    "Hanoi",
    "Zurich",
    "Austin",
    "Bergen",
    "Porto",
    "Seoul",
    "Tunis",
    "Malmo",
]
_THINGS = [
    "bridge",
    "library",
    "museum",
    "tower",
    "school",
    "theater",
    "hospital",
    "station",
    "harbor",
    "garden",
    "observatory",
    "stadium",
]
_ADJS = ["old", "large", "famous", "small", "modern", "red", "white", "quiet"]
_MATERIALS = ["stone", "glass", "steel", "wood", "brick", "concrete"]


def squad_examples(n_paragraphs: int, seed: int = 0, prefix: str = "q") -> dict:
    """A SQuAD v1.1 dict with ``n_paragraphs`` paragraphs of 3 facts and 3 questions each."""
    rng = random.Random(seed)
    paragraphs = []
    qid = 0
    for _ in range(n_paragraphs):
        thing, adj, city = rng.choice(_THINGS), rng.choice(_ADJS), rng.choice(_CITIES)
        person, year, material = rng.choice(_PEOPLE), str(rng.randrange(1700, 2020)), rng.choice(_MATERIALS)
        sentences = [
            (
                f"The {adj} {thing} of {city} was designed by {person}.",
                person,
                f"Who designed the {adj} {thing} of {city}?",
            ),
            (f"Work on it started in {year}.", year, f"In which year did work on the {thing} in {city} start?"),
            (f"Its walls are made of {material}.", material, f"What are the walls of the {thing} in {city} made of?"),
        ]
        rng.shuffle(sentences)
        context, qas = "", []
        for sent, answer, question in sentences:
            start = len(context) + sent.index(answer)
            context += sent + " "
            qas.append(
                {"id": f"{prefix}{qid}", "question": question, "answers": [{"text": answer, "answer_start": start}]}
            )
            qid += 1
        context = context.strip()
        for qa in qas:  # the answer is exactly the span at answer_start
            a = qa["answers"][0]
            assert context[a["answer_start"] : a["answer_start"] + len(a["text"])] == a["text"]
        paragraphs.append({"context": context, "qas": qas})
    return {"version": "1.1", "data": [{"title": "synthetic", "paragraphs": paragraphs}]}


def write_squad(out_dir: str, train_paragraphs: int = 200, dev_paragraphs: int = 40, seed: int = 0) -> Tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, n, s in (("train", train_paragraphs, seed), ("dev", dev_paragraphs, seed + 1000)):
        path = os.path.join(out_dir, f"{name}-v1.1.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(squad_examples(n, seed=s, prefix=f"{name}-"), f)
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fnl_transformers.recipes.synthetic", description=__doc__.splitlines()[0]
    )
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("parallel", help="train/valid/test.{src,tgt} of the toy language pair")
    a.add_argument("out_dir")
    a.add_argument("--src", default="de")
    a.add_argument("--tgt", default="en")
    a.add_argument("--sizes", type=int, nargs=3, default=(12000, 400, 400), metavar=("TRAIN", "VALID", "TEST"))
    a.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("mono", help="monolingual text for MLM")
    b.add_argument("path")
    b.add_argument("--lines", type=int, default=4000)
    b.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("squad", help="SQuAD v1.1 train/dev JSON")
    c.add_argument("out_dir")
    c.add_argument("--train-paragraphs", type=int, default=200)
    c.add_argument("--dev-paragraphs", type=int, default=40)
    c.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.what == "parallel":
        counts = write_parallel(args.out_dir, args.src, args.tgt, tuple(args.sizes), args.seed)
        print(f"synthetic parallel corpus in {args.out_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    elif args.what == "mono":
        write_monolingual(args.path, args.lines, args.seed)
        print(f"synthetic monolingual corpus: {args.path} ({args.lines} lines)")
    else:
        train, dev = write_squad(args.out_dir, args.train_paragraphs, args.dev_paragraphs, args.seed)
        print(f"synthetic SQuAD v1.1: {train} {dev}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
