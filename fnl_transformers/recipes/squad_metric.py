"""SQuAD v1.1 exact match and F1 with the official evaluation semantics (evaluate-v1.1.py).

Answer normalization, in the official order: lower case; remove ASCII punctuation (``string.punctuation``; other
Unicode punctuation stays); remove the articles ``a``, ``an``, ``the`` as whole words; collapse whitespace.
EM of a question is 1 when the normalized prediction equals a normalized ground truth; F1 is the bag-of-tokens
F1 of the normalized token lists (0 when no token is shared); both take the max over the question's ground-truth
answers. Dataset scores are percentages over ALL questions: an unanswered question scores 0 (and is counted and
reported, never silently skipped).

``python -m fnl_transformers.recipes.squad_metric DATA.json PREDICTIONS.json`` prints
``{"exact_match": ..., "f1": ...}`` like the official script (PREDICTIONS: ``{question_id: answer_text}``).
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections import Counter
from typing import Dict, Iterable, List

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def max_over_truths(metric, prediction: str, truths: Iterable[str]) -> float:
    truths = list(truths)
    if not truths:
        raise ValueError("a question has no ground-truth answer: SQuAD v1.1 needs at least one per question")
    return max(metric(prediction, t) for t in truths)


def evaluate(dataset: List[dict], predictions: Dict[str, str]) -> Dict[str, float]:
    """``dataset``: the ``data`` list of a SQuAD v1.1 JSON file. Returns exact_match, f1 (percent), counts."""
    em = f = 0.0
    total = unanswered = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    unanswered += 1
                    continue
                truths = [a["text"] for a in qa["answers"]]
                em += max_over_truths(exact_match, predictions[qa["id"]], truths)
                f += max_over_truths(f1, predictions[qa["id"]], truths)
    if total == 0:
        raise ValueError("the dataset has no questions")
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f / total, "questions": total, "unanswered": unanswered}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fnl_transformers.recipes.squad_metric", description=__doc__.splitlines()[0]
    )
    p.add_argument("dataset", help="SQuAD v1.1 JSON (with 'data')")
    p.add_argument("predictions", help="JSON {question_id: answer text}")
    args = p.parse_args(argv)
    with open(args.dataset) as f:
        data = json.load(f)
    with open(args.predictions) as f:
        preds = json.load(f)
    result = evaluate(data["data"], preds)
    if result["unanswered"]:
        print(f"{result['unanswered']} of {result['questions']} questions unanswered (scored 0)", file=sys.stderr)
    print(json.dumps({"exact_match": result["exact_match"], "f1": result["f1"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
