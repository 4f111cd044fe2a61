"""Output-level fidelity of a compressed model to its original, on text.

Per-layer weight errors say little about what a compressed model still computes. These functions compare two
models (same tokenizer) on the same texts:

* :func:`embedding_cosine`: cosine similarity of the mean-pooled last hidden states (padding excluded), per text
  and their mean: the sentence embedding a sentence-transformers model returns, before normalization;
* :func:`neighbour_agreement`: the fraction of texts whose nearest other text (cosine of those embeddings) is the
  same for both models (needs at least 3 texts);
* :func:`lm_loss`: the language-modelling loss where the model has an LM head: masked-LM loss for masked LMs
  (a fixed, seeded choice of ``mask_prob`` of the non-special tokens, each replaced by the mask token; at least one
  per text), next-token loss for causal LMs; ``None`` for a model without an LM head;
* :func:`fidelity_report` gathers them, :func:`format_fidelity` prints them in one line.

All functions run in eval mode without gradients and leave the models' modes unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import batches, check_texts

BATCH_SIZE = 16
MAX_LENGTH = 128


@contextmanager
def _evaluating(model: nn.Module):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _device(model: nn.Module):
    return next(model.parameters()).device


def mean_pooled(
    model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = BATCH_SIZE, max_length: int = MAX_LENGTH
) -> torch.Tensor:
    """Mean over real tokens of the last hidden state, one row per text (float32, on the CPU)."""
    texts = check_texts(texts, "texts")
    rows = []
    with _evaluating(model):
        for batch in batches(tokenizer, texts, batch_size, max_length, _device(model)):
            out = model(**batch, output_hidden_states=True)
            hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).float().cpu())
    return torch.cat(rows)


def embedding_cosine(
    reference: nn.Module, candidate: nn.Module, tokenizer, texts: Sequence[str], **kwargs
) -> Dict[str, object]:
    """``{"per_text": [cosine per text], "mean": ..., "min": ...}`` of the two models' mean-pooled embeddings."""
    a = mean_pooled(reference, tokenizer, texts, **kwargs)
    b = mean_pooled(candidate, tokenizer, texts, **kwargs)
    cos = F.cosine_similarity(a.double(), b.double(), dim=1)
    return {"per_text": [float(c) for c in cos], "mean": float(cos.mean()), "min": float(cos.min())}


def neighbour_agreement(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    """Fraction of rows whose nearest other row (by cosine) is the same in ``a`` and ``b``; ``None`` for fewer
    than 3 rows (the nearest other row of 2 rows is forced)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must be matrices of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 3:
        return None

    def nearest(x):
        x = F.normalize(x.double(), dim=1)
        sim = x @ x.t()
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)

    return float((nearest(a) == nearest(b)).double().mean())


def _lm_kind(model: nn.Module) -> Optional[str]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    name = type(model).__name__
    if name in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()):
        return "mlm"
    if name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return "clm"
    return None


def _mask_tokens(batch: dict, tokenizer, generator: torch.Generator, mask_prob: float):
    ids = batch["input_ids"].clone()
    special = torch.zeros_like(ids, dtype=torch.bool)
    for sid in tokenizer.all_special_ids:
        special |= ids == sid
    candidates = (~special) & batch["attention_mask"].bool()
    draw = torch.rand(ids.shape, generator=generator) < mask_prob
    chosen = draw.to(ids.device) & candidates
    for i in range(ids.shape[0]):  # at least one masked token per text that has any
        if not bool(chosen[i].any()) and bool(candidates[i].any()):
            pos = candidates[i].nonzero().flatten()
            chosen[i, pos[int(torch.randint(len(pos), (1,), generator=generator))]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids[chosen] = tokenizer.mask_token_id
    return {**batch, "input_ids": ids}, labels


def lm_loss(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    seed: int = 0,
    mask_prob: float = 0.15,
    batch_size: int = BATCH_SIZE,
    max_length: int = MAX_LENGTH,
) -> Optional[Dict[str, object]]:
    """``{"kind": "mlm" | "clm", "loss": mean cross-entropy per predicted token, "tokens": count}``, or ``None``
    when ``model`` has no masked or causal LM head. Masked positions depend only on ``seed``, the tokenizer and
    the texts, so two models see the same masks."""
    texts = check_texts(texts, "texts")
    kind = _lm_kind(model)
    if kind is None:
        return None
    if kind == "mlm" and tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token; a masked-LM loss needs one")
    if not 0 < mask_prob < 1:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    with _evaluating(model):
        for batch in batches(tokenizer, texts, batch_size, max_length, _device(model)):
            if kind == "mlm":
                batch, labels = _mask_tokens(batch, tokenizer, generator, mask_prob)
                logits = model(**batch).logits
            else:
                logits = model(**batch).logits[:, :-1]
                labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += int((labels != -100).sum())
    if not count:
        raise ValueError("the texts have no token to predict (too short?)")
    return {"kind": kind, "loss": total / count, "tokens": count}


def fidelity_report(
    reference: nn.Module,
    candidate: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    max_length: int = MAX_LENGTH,
) -> Dict[str, object]:
    """How closely ``candidate`` reproduces ``reference`` on ``texts``: ``cosine`` (mean-pooled embeddings: mean,
    min, per text), ``neighbours`` (nearest-neighbour agreement, or None), ``lm_loss`` (``{"kind", "reference",
    "candidate", "tokens"}``, or None without an LM head) and ``texts`` (how many)."""
    texts = check_texts(texts, "texts")
    kw = dict(batch_size=batch_size, max_length=max_length)
    a = mean_pooled(reference, tokenizer, texts, **kw)
    b = mean_pooled(candidate, tokenizer, texts, **kw)
    cos = F.cosine_similarity(a.double(), b.double(), dim=1)
    report: Dict[str, object] = {
        "texts": len(texts),
        "cosine": {"mean": float(cos.mean()), "min": float(cos.min()), "per_text": [float(c) for c in cos]},
        "neighbours": neighbour_agreement(a, b),
        "lm_loss": None,
    }
    ref_loss = lm_loss(reference, tokenizer, texts, seed=seed, **kw)
    if ref_loss is not None:
        cand_loss = lm_loss(candidate, tokenizer, texts, seed=seed, **kw)
        report["lm_loss"] = {
            "kind": ref_loss["kind"],
            "reference": ref_loss["loss"],
            "candidate": None if cand_loss is None else cand_loss["loss"],
            "tokens": ref_loss["tokens"],
        }
    return report


def format_fidelity(report: Dict[str, object]) -> str:
    """One line: ``output fidelity on N texts: cosine mean .. (min ..), nearest neighbours .., MLM loss a -> b``."""
    cos = report["cosine"]
    parts = [f"cosine of mean-pooled hidden states {cos['mean']:.4f} (min {cos['min']:.4f})"]
    if report.get("neighbours") is not None:
        parts.append(f"nearest neighbours kept {report['neighbours']:.0%}")
    lm = report.get("lm_loss")
    if lm:
        name = "masked-LM" if lm["kind"] == "mlm" else "next-token"
        parts.append(f"{name} loss {lm['reference']:.4f} -> {lm['candidate']:.4f}")
    return f"output fidelity on {report['texts']} texts: " + ", ".join(parts)


__all__: List[str] = [
    "embedding_cosine",
    "fidelity_report",
    "format_fidelity",
    "lm_loss",
    "mean_pooled",
    "neighbour_agreement",
]
