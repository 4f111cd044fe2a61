"""Parameter summary after patching (PEFT's print_trainable_parameters style), against hand counts."""

from fnl_transformers.core import FactorizedEmbedding, FactorizedLinear
from fnl_transformers.hf import FNLConfig, parameter_summary, patch_model, print_parameter_summary

from hf_patch_helpers import tiny


def _numel(params):
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def test_summary_of_a_patched_bert(capsys):
    model = patch_model(tiny("bert"), FNLConfig(rank_scale=0.5, head_dim=4))
    s = parameter_summary(model)
    assert s["total"] == _numel(model.parameters()) == model.config.fnl_config["params_after"]
    assert s["original"] == model.config.fnl_config["params_before"] == _numel(tiny("bert").parameters())
    factors = [
        getattr(m, k)
        for m in model.modules()
        if isinstance(m, (FactorizedLinear, FactorizedEmbedding))
        for k in ("U", "V")
    ]
    assert s["factorized"] == _numel(factors)
    heads = [
        lin.weight
        for layer in model.bert.encoder.layer
        for lin in (
            layer.attention.self.query,
            layer.attention.self.key,
            layer.attention.self.value,
            layer.attention.output.dense,
        )
    ]
    assert s["attention"] == _numel(heads)
    assert s["by_kind"]["qk"] + s["by_kind"]["ov"] == s["attention"]  # q, k in QK forms; v, o in OV forms
    emb = model.bert.embeddings.word_embeddings
    assert s["by_kind"]["embedding"] == emb.U.numel() + emb.V.numel()
    assert s["other"] == s["total"] - s["factorized"] - s["attention"]
    assert s["trainable"] == s["total"] and s["trainable_percent"] == 100.0

    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    s = parameter_summary(model)
    assert s["trainable"] == s["total"] - _numel(model.bert.embeddings.parameters())
    print_parameter_summary(model)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || trainable%: ")
    assert f"of the original {s['original']:,}: {s['total'] / s['original']:.3f}" in line


def test_summary_of_an_unpatched_model():
    model = tiny("gpt2")
    s = parameter_summary(model)
    assert s["factorized"] == s["attention"] == 0 and s["other"] == s["total"] and s["original"] is None
    assert s["total"] == _numel(model.parameters())  # the tied LM head counted once


def test_fused_projection_counts_in_both_kinds():
    model = patch_model(tiny("gpt2"), FNLConfig())
    s = parameter_summary(model)
    c_attn = model.transformer.h[0].attn.c_attn.weight.numel() * len(model.transformer.h)
    c_proj = model.transformer.h[0].attn.c_proj.weight.numel() * len(model.transformer.h)
    assert s["by_kind"]["qk"] == c_attn and s["by_kind"]["ov"] == c_attn + c_proj
    assert s["attention"] == c_attn + c_proj
