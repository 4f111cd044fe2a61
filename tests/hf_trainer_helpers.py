"""Shared helpers of the Trainer tests: a tiny factorized BERT, an MLM data set, a short Trainer run.

Also imported by ``tests/hf_trainer_ddp_script.py`` (the torchrun worker), so it must not import pytest.
"""

from __future__ import annotations

import os
from typing import Dict, List

import torch

VOCAB, HIDDEN, LAYERS, HEADS, FFN, SEQ = 48, 32, 2, 4, 64, 8
FD = {"linear": 0.05, "qk": 0.05, "ov": 0.05}  # large enough that FD moves the weights visibly in 3 updates


def tiny_bert(seed: int = 0, dropout: float = 0.0, fd_mode: str = "coupled", heads: int = HEADS):
    """BertForMaskedLM (hidden 32, 2 layers, 4 heads) patched with rank-16 factorized FFN layers (SI), QK/OV
    forms, and FD coefficients ``FD`` in its FNLConfig (``model.fnl_config``). ``heads`` other than 4: hidden
    ``8 * heads``."""
    from transformers import BertConfig, BertForMaskedLM

    from fnl_transformers.hf import FNLConfig, patch_model

    torch.manual_seed(seed)
    hidden = HIDDEN if heads == HEADS else 8 * heads
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        intermediate_size=FFN,
        max_position_embeddings=2 * SEQ,
        type_vocab_size=1,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    fd = {f"fd_{k}": v for k, v in FD.items()}
    return patch_model(BertForMaskedLM(cfg), FNLConfig(rank_scale=0.5, factorize=("ffn",), fd_mode=fd_mode, **fd))


def tiny_gpt2(seed: int = 0):
    """GPT2LMHeadModel (32 wide, 2 layers, 4 heads, fused Conv1D attention) patched like ``tiny_bert``; its loss
    reads ``num_items_in_batch`` (unlike BERT's MLM head) and shifts labels."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fnl_transformers.hf import FNLConfig, patch_model

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=2 * SEQ,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    fd = {f"fd_{k}": v for k, v in FD.items()}
    return patch_model(GPT2LMHeadModel(cfg), FNLConfig(rank_scale=0.5, factorize=("ffn",), **fd))


class MLMData(torch.utils.data.Dataset):
    """``n`` random sequences whose MLM labels cover 1..4 positions (so micro-batches differ in label count:
    a per-micro-batch mean differs from the large-batch mean) and, with ``empty``, some none at all."""

    def __init__(self, n: int = 16, seed: int = 1, empty: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.items: List[Dict[str, torch.Tensor]] = []
        for i in range(n):
            ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
            labels = torch.full((SEQ,), -100)
            k = 0 if empty and i % 4 == 3 else 1 + i % 4
            pos = torch.randperm(SEQ, generator=g)[:k]
            labels[pos] = ids[pos]
            ids = ids.clone()
            ids[pos] = 0  # the [MASK] stand-in
            self.items.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def training_args(out_dir: str, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.1,
        max_grad_norm=0.0,
        seed=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        average_tokens_across_devices=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def params(model) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_rel_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], start: Dict[str, torch.Tensor]) -> float:
    """max |a - b| over all parameters, relative to how far ``b`` moved from ``start`` (its max |b - start|)."""
    assert a.keys() == b.keys()
    diff = max(float((a[n] - b[n]).abs().max()) for n in a)
    moved = max(float((b[n] - start[n]).abs().max()) for n in b)
    assert moved > 0, "training did not move the parameters"
    return diff / moved


def quiet():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
