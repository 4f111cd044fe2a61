"""patch_model: exactness against the unpatched model and best-rank-r optimality against independent SVDs.

Tolerances: outputs of exact rewrites agree to 1e-5 relative (float32; measured <= 2.6e-7), except full-rank
factorizations, whose factors come from a float32 SVD: 1e-4 (measured <= 1.5e-6 for the tiny models and 3.9e-6
through MiniLM's 6 layers). Eckart-Young checks compare squared errors with the tail of independently computed
singular values (float64) to 1e-4 relative.
"""

import copy

import pytest
import torch

from fnl_transformers.core import FactorizedEmbedding, FactorizedLinear, form_parameters, frobenius_penalty
from fnl_transformers.hf import FNLConfig, get_fnl_config, patch_model
from fnl_transformers.hf.layers import HeadPaddedLinear, TiedFactorizedHead
from fnl_transformers.hf.persist import plan_of

from hf_patch_helpers import inputs, make_heads_rank_deficient, minilm_dir, outputs, rel_diff, tiny

ARCHS = ["bert", "roberta", "distilbert", "gpt2", "llama", "llama_mha", "llama_tied", "mistral", "qwen2"]
SVD_RTOL = 1e-4  # full-rank SI through a float32 SVD (module docstring): >= 25x above the measured differences


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_dir()).eval()


def tail_sq(W: torch.Tensor, r: int) -> torch.Tensor:
    """Per-matrix squared Frobenius error of the best rank-r approximation (Eckart-Young), SVD in W's dtype."""
    s = torch.linalg.svdvals(W.detach()).double()
    return s[..., r:].pow(2).sum(-1)


# --- full rank: outputs unchanged -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_factorization_keeps_outputs(arch):
    model = tiny(arch)
    batch = inputs(model)
    ref = outputs(model, batch)
    patched = patch_model(copy.deepcopy(model), FNLConfig(rank_scale=1.0))
    kinds = {type(m) for m in patched.modules()}
    assert FactorizedLinear in kinds and FactorizedEmbedding in kinds
    assert rel_diff(outputs(patched, batch), ref) < SVD_RTOL


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "gpt2", "llama_mha"])
@pytest.mark.parametrize("qk,ov", [(3, 3), (5, 2), (2, 6)])
def test_shrinking_heads_to_their_rank_is_exact(arch, qk, ov):
    """Heads whose QK / OV forms have rank <= r shrink to r without changing any output (query bias kept as an
    extra column, key bias dropped, value bias folded; original scaling), with equal or unequal QK/OV dims."""
    if arch.startswith("llama"):
        qk = 8  # RoPE: QK heads are never shrunk
    model = tiny(arch)
    make_heads_rank_deficient(model, qk, ov)
    batch = inputs(model)
    ref = outputs(model, batch)
    patched = patch_model(copy.deepcopy(model), FNLConfig(head_dim_qk=qk, head_dim_ov=ov))
    assert sum(p.numel() for p in patched.parameters()) < sum(p.numel() for p in model.parameters())
    assert rel_diff(outputs(patched, batch), ref) < 1e-5
    if qk != ov:
        assert any(isinstance(m, HeadPaddedLinear) for m in patched.modules()) or arch == "gpt2"


def test_output_attentions_still_work_after_shrinking():
    model = tiny("bert")
    model.config._attn_implementation = "eager"  # sdpa returns no attention probabilities
    make_heads_rank_deficient(model, 3, 3)
    batch = inputs(model)
    with torch.no_grad():
        ref = model(**batch, output_attentions=True).attentions
        patched = patch_model(copy.deepcopy(model), FNLConfig(head_dim=3))
        got = patched(**batch, output_attentions=True).attentions
    assert len(got) == len(ref) == 2
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert rel_diff(a, b) < 1e-5


def test_minilm_full_rank_equivalence(minilm):
    """The real pretrained MiniLM (its [PAD] embedding row is nonzero, so it is kept, not zeroed)."""
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    ref = outputs(minilm, batch)
    patched = patch_model(copy.deepcopy(minilm), FNLConfig(rank_scale=1.0))
    assert patched.embeddings.word_embeddings.padding_idx is None
    assert patched.config.fnl_config["layers"]["embeddings.word_embeddings"]["orig_padding_idx"] == 0
    assert rel_diff(outputs(patched, batch), ref) < SVD_RTOL


# --- reduced rank: best rank-r approximations ---------------------------------------------------------------------
def _bert_forms(att, heads):
    """Dense per-head forms of a BERT attention module: QK with the query-bias column, and OV."""
    s, o = att.self, att.output.dense
    d = s.query.in_features
    r = s.query.out_features // heads
    Wq = torch.cat([s.query.weight.reshape(heads, r, d), s.query.bias.reshape(heads, r, 1)], 2)  # H x r x (d+1)
    Wk = s.key.weight.reshape(heads, r, d)
    qk = Wq.transpose(1, 2) @ Wk  # H x (d+1) x d
    Wo = o.weight.reshape(o.out_features, heads, r).permute(1, 0, 2)  # H x d x r
    ov = Wo @ s.value.weight.reshape(heads, r, d)  # H x d x d
    return qk.detach().double(), ov.detach().double()


def test_minilm_heads_are_best_rank_r(minilm):
    """Every head of the first and last layer (SVDs in float32 for speed: 1e-3 relative)."""
    r = 16
    H = minilm.config.num_attention_heads
    patched = patch_model(copy.deepcopy(minilm), FNLConfig(head_dim=r))
    for i in (0, 5):
        layer, new_layer = minilm.encoder.layer[i], patched.encoder.layer[i]
        qk, ov = _bert_forms(layer.attention, H)
        qk2, ov2 = _bert_forms(new_layer.attention, H)
        for full, approx in ((qk, qk2), (ov, ov2)):
            err = (full - approx).pow(2).sum((1, 2))
            assert torch.allclose(err, tail_sq(full.float(), r), rtol=1e-3, atol=1e-9)
        assert new_layer.attention.self.attention_head_size == r
        assert new_layer.attention.self.scaling == layer.attention.self.scaling  # original 1/sqrt(32)
        with torch.no_grad():
            assert float(new_layer.attention.self.key.bias.abs().max()) == 0.0  # dropped (softmax-invariant)
            assert float(new_layer.attention.self.value.bias.abs().max()) == 0.0  # folded into the output bias
        entry = patched.config.fnl_config["attention"][f"encoder.layer.{i}.attention"]
        assert entry["qk_rel_error"] == pytest.approx(float(tail_sq(qk.float(), r).sum().sqrt() / qk.norm()), rel=1e-3)
        assert entry["ov_rel_error"] == pytest.approx(float(tail_sq(ov.float(), r).sum().sqrt() / ov.norm()), rel=1e-3)


def test_gpt2_fused_heads_are_best_rank_r():
    model = tiny("gpt2")
    H, r = 4, 3
    patched = patch_model(copy.deepcopy(model), FNLConfig(head_dim_qk=r, head_dim_ov=5))

    def forms(att, rq, rv):
        W, b = att.c_attn.weight, att.c_attn.bias  # d x (H rq + H rq + H rv), Conv1D layout
        d = W.shape[0]
        Wq = torch.cat([W[:, : H * rq].t().reshape(H, rq, d), b[: H * rq].reshape(H, rq, 1)], 2)
        Wk = W[:, H * rq : 2 * H * rq].t().reshape(H, rq, d)
        Wv = W[:, 2 * H * rq :].t().reshape(H, rv, d)
        Wo = att.c_proj.weight.t().reshape(d, H, rv).permute(1, 0, 2)
        return (Wq.transpose(1, 2) @ Wk).double(), (Wo @ Wv).double()

    for blk, new in zip(model.transformer.h, patched.transformer.h):
        qk, ov = forms(blk.attn, 8, 8)
        qk2, ov2 = forms(new.attn, r, 5)
        assert torch.allclose((qk - qk2).pow(2).sum((1, 2)), tail_sq(qk, r), rtol=1e-4, atol=1e-10)
        assert torch.allclose((ov - ov2).pow(2).sum((1, 2)), tail_sq(ov, 5), rtol=1e-4, atol=1e-10)
        assert new.attn.head_dim == 5 and new.attn.split_size == 4 * 5 and new.attn.scaling == blk.attn.scaling


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_factorized_layers_are_best_rank_r(arch):
    model = tiny(arch)
    patched = patch_model(copy.deepcopy(model), FNLConfig(rank_scale=0.25))
    dense = dict(model.named_modules())
    checked = 0
    for name, layer in patched.named_modules():
        if isinstance(layer, (FactorizedLinear, FactorizedEmbedding)):
            W = dense[name].weight.detach()
            W = W.t() if arch == "gpt2" and "mlp" in name else W  # Conv1D stores the transpose
            err = (W.double() - layer.product().detach().double()).pow(2).sum()
            assert float(err) == pytest.approx(float(tail_sq(W.double(), layer.rank)), rel=1e-4)
            assert layer.rank == max(1, round(0.25 * min(W.shape)))
            checked += 1
    # 2 blocks x FFN layers (2, or Llama's 3) + input embedding (+ Llama's untied LM head; tied heads have no factors)
    assert checked == {"bert": 2 * 2 + 1, "gpt2": 2 * 2 + 1, "llama": 2 * 3 + 2}[arch]


# --- embeddings, tying, forms ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,head",
    [
        ("gpt2", "lm_head"),
        ("bert", "cls.predictions.decoder"),
        ("distilbert", "vocab_projector"),
        ("roberta", "lm_head.decoder"),
        ("llama_tied", "lm_head"),
    ],
)
def test_tied_output_embedding_follows_factorized_input_embedding(arch, head):
    model = patch_model(tiny(arch), FNLConfig(rank_scale=0.5))
    out = model.get_submodule(head)
    assert isinstance(out, TiedFactorizedHead) and out.embedding is model.get_input_embeddings()
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(head + ".U") or n.startswith(head + ".V") for n in names)  # stored once
    x = torch.randn(3, model.config.hidden_size)
    bias = 0 if out.bias is None else out.bias
    logits = x @ model.get_input_embeddings().weight.t()
    assert torch.allclose(out(x), logits + bias, atol=1e-5)
    with torch.no_grad():  # a change of the embedding factors is seen by the head
        model.get_input_embeddings().U.mul_(2)
    assert torch.allclose(out(x), 2 * logits + bias, atol=1e-5)


def test_untied_llama_head_is_factorized_as_an_embedding():
    model = patch_model(tiny("llama"), FNLConfig(rank_scale=0.5))
    assert isinstance(model.lm_head, FactorizedLinear) and model.lm_head.fd_kind == "embedding"
    kinds = {n: k for n, _, k in form_parameters(model)}
    assert kinds["lm_head.U"] == "embedding" and kinds["model.embed_tokens.U"] == "embedding"
    assert kinds["model.layers.0.mlp.up_proj.U"] == "linear"


def test_llama_gqa_qk_fd_matches_dense_math():
    """FD on QK/OV under grouped-query attention (4 query heads share 2 key/value heads) equals the dense
    sum over heads of ||W_q,h W_k,g(h)^T||^2 / 2 (and the OV analogue)."""
    model = patch_model(tiny("llama"), FNLConfig(fd_qk=1.0, fd_ov=1.0))
    att = model.model.layers[0].self_attn
    H, G, hd = 4, 2, 8
    Wq = att.q_proj.weight.reshape(H, hd, -1).double()
    Wk = att.k_proj.weight.reshape(G, hd, -1).double().repeat_interleave(H // G, 0)
    Wv = att.v_proj.weight.reshape(G, hd, -1).double().repeat_interleave(H // G, 0)
    Wo = att.o_proj.weight.reshape(-1, H, hd).permute(1, 0, 2).double()
    qk = (Wq.transpose(1, 2) @ Wk).pow(2).sum() / 2
    ov = (Wo @ Wv).pow(2).sum() / 2
    one = torch.nn.Module()
    one.att = att
    got = frobenius_penalty(one, qk=1.0, ov=1.0)
    assert float(got.detach()) == pytest.approx(float((qk + ov).detach()), rel=1e-5)
    assert get_fnl_config(model).fd_qk == 1.0 and model.fnl_config.fd_ov == 1.0


def test_fd_penalty_covers_every_kind_after_patching():
    model = patch_model(tiny("bert"), FNLConfig(rank_scale=0.5, head_dim=4))
    expected = 0.0
    for m in model.modules():
        if isinstance(m, (FactorizedLinear, FactorizedEmbedding)):
            expected += 0.5 * float(m.product().detach().double().pow(2).sum())
    got = frobenius_penalty(model, linear=1.0, embedding=1.0)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(frobenius_penalty(model, qk=1.0).detach()) > 0


def test_deep_factors_start_as_the_si_product():
    model = tiny("bert")
    batch = inputs(model)
    patched = patch_model(copy.deepcopy(model), FNLConfig(rank_scale=1.0, deep=True))
    layer = patched.bert.encoder.layer[0].intermediate.dense
    assert layer.M is not None and torch.equal(layer.M, torch.eye(layer.rank))
    assert rel_diff(outputs(patched, batch), outputs(model, batch)) < SVD_RTOL


def test_spectral_init_false_draws_fresh_factors():
    model = tiny("bert")
    patched = patch_model(copy.deepcopy(model), FNLConfig(rank_scale=0.5, head_dim=4, spectral_init=False))
    layer = patched.bert.encoder.layer[0].intermediate.dense
    W = model.bert.encoder.layer[0].intermediate.dense.weight.detach()
    assert float((layer.product().detach() - W).norm()) > float(tail_sq(W, layer.rank).sqrt()) * 1.01
    assert patched.config.fnl_config["layers"]["bert.encoder.layer.0.intermediate.dense"].get("rel_error") is None
    assert patched.bert.encoder.layer[0].attention.self.query.out_features == 16


def _head_grams(model):
    """Per attention module and form: (A^T A, B^T B) of every head (QK with the query-bias row), float64."""
    from fnl_transformers.core import HeadDims
    from fnl_transformers.hf.arch import arch_for

    arch = arch_for(model)
    H = model.config.num_attention_heads
    out = []
    for _, att in arch.attention_modules(model):
        hd = arch.original_head_dim(att, H)
        t = {k: None if v is None else v.double() for k, v in arch.read(att, HeadDims(H, H, hd, hd, hd)).items()}
        roles = {"qk": ("q_weight", "k_weight", "q_bias"), "ov": ("o_weight", "v_weight", None)}
        for form, (a, b, bias) in roles.items():
            A = t[a].reshape(H, hd, -1).transpose(1, 2) if form == "qk" else t[a].reshape(-1, H, hd).permute(1, 0, 2)
            if bias and t[bias] is not None:
                A = torch.cat([A, t[bias].reshape(H, 1, hd)], dim=1)
            B = t[b].reshape(H, hd, -1).transpose(1, 2)
            out.append((A.transpose(1, 2) @ A, B.transpose(1, 2) @ B))
    return out


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2"])
def test_spectral_init_at_full_head_dim_rebalances_each_head(arch):
    """spectral_init_qk/ov=True at the full head dim: per-head SI at full rank, outputs unchanged (1e-5 relative),
    and each head's factors balanced, A^T A = B^T B (1e-5 relative to the largest entry; float32 weights)."""
    model = tiny(arch)
    batch = inputs(model)
    ref = outputs(model, batch)
    assert any(float((ga - gb).abs().max()) > 1e-2 * float(ga.abs().max()) for ga, gb in _head_grams(model))
    patched = patch_model(copy.deepcopy(model), FNLConfig(spectral_init_qk=True, spectral_init_ov=True))
    assert rel_diff(outputs(patched, batch), ref) < 1e-5
    for ga, gb in _head_grams(patched):
        assert float((ga - gb).abs().max()) <= 1e-5 * float(ga.abs().max())
    entry = patched.config.fnl_config["attention"][next(iter(patched.config.fnl_config["attention"]))]
    assert entry["init_qk"] == entry["init_ov"] == "spectral" and entry["qk_rel_error"] < 1e-5


def test_spectral_init_of_rope_queries_is_refused():
    with pytest.raises(ValueError, match="rotary position embeddings"):
        patch_model(tiny("llama_mha"), FNLConfig(spectral_init_qk=True))


# --- rank selection -----------------------------------------------------------------------------------------------
def test_per_module_ranks_override_rank_scale():
    cfg = FNLConfig(rank_scale=0.5, ranks={"*.layer.0.intermediate.dense": 3, "*word_embeddings": 5})
    model = patch_model(tiny("bert"), cfg)
    assert model.bert.encoder.layer[0].intermediate.dense.rank == 3
    assert model.bert.encoder.layer[1].intermediate.dense.rank == 16
    assert model.bert.embeddings.word_embeddings.rank == 5


def test_ranks_that_grow_the_model_are_one_warning():
    with pytest.warns(
        UserWarning,
        match=r"^2 factorized layer\(s\) get more parameters than their dense weights "
        r"\(bert.encoder.layer.0.intermediate.dense rank 10000 of 64 x 32: 2,048 -> "
        r"960,000 parameters",
    ):
        patch_model(tiny("bert"), FNLConfig(ranks={"*intermediate.dense": 10000}))


def test_rank_pattern_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"match no layer.*intermediate"):
        patch_model(tiny("bert"), FNLConfig(ranks={"*.intermediat.dense": 3}))


def test_target_param_ratio_is_met():
    model = tiny("bert")
    total = sum(p.numel() for p in model.parameters())
    patched = patch_model(model, FNLConfig(target_param_ratio=0.8, head_dim=6))
    after = sum(p.numel() for p in patched.parameters())
    assert after <= 0.8 * total
    assert after > 0.75 * total  # the largest scale under the target, not a much smaller one
    with pytest.raises(ValueError, match="unreachable"):
        patch_model(tiny("bert"), FNLConfig(target_param_ratio=0.05, factorize=("ffn",)))


def test_attention_part_shrinks_heads_by_rank_scale():
    model = patch_model(tiny("distilbert"), FNLConfig(rank_scale=0.5, factorize=("attention",)))
    att = model.distilbert.transformer.layer[0].attention
    assert att.attention_head_size == 4 and att.q_lin.out_features == 16
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())


# --- the official code's rules: position tables, factors from the dense init, fresh reduced heads ---------------
@pytest.mark.parametrize(
    "arch, table",
    [
        ("bert", "bert.embeddings.position_embeddings"),
        ("roberta", "roberta.embeddings.position_embeddings"),
        ("distilbert", "distilbert.embeddings.position_embeddings"),
        ("gpt2", "transformer.wpe"),
    ],
)
def test_position_part_factorizes_learned_position_tables(arch, table):
    model = tiny(arch)
    W = model.get_submodule(table).weight.detach().clone()
    patched = patch_model(model, FNLConfig(rank_scale=0.5, factorize=("position",)))
    layer = patched.get_submodule(table)
    assert isinstance(layer, FactorizedEmbedding) and layer.rank == round(0.5 * min(W.shape))
    assert not any(isinstance(m, FactorizedLinear) for m in patched.modules())  # only the position table
    err = float((layer.product().detach().double() - W.double()).norm() ** 2)
    assert abs(err - float(tail_sq(W, layer.rank))) <= 1e-4 * float(W.double().norm() ** 2)  # SI: best rank r


def test_position_part_is_refused_for_rotary_positions():
    with pytest.raises(ValueError, match="factorize 'position' needs learned position embeddings.*RoPE"):
        patch_model(tiny("llama_mha"), FNLConfig(rank_scale=0.5, factorize=("ffn", "position")))


def test_dense_factor_init_draws_each_factor_from_the_model_initializer():
    """``factor_init='dense'`` without SI: both factors ``N(0, initializer_range^2)`` (std within 10%)."""
    model = patch_model(tiny("bert"), FNLConfig(rank_scale=0.5, spectral_init=False, factor_init="dense"))
    std = model.config.initializer_range
    layers = [m for m in model.modules() if isinstance(m, (FactorizedLinear, FactorizedEmbedding))]
    assert layers
    for layer in layers:
        for f in (layer.U, layer.V):
            keep = torch.ones(f.shape[0], dtype=torch.bool)
            if f is layer.U and getattr(layer, "padding_idx", None) is not None:
                keep[layer.padding_idx] = False  # the zero padding row
            assert abs(float(f.detach()[keep].std()) / std - 1) < 0.1


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_fresh_reduced_heads_are_rebalanced_and_scored_by_the_reduced_dim(arch):
    """``reduced_heads='fresh'``: heads of dim 4 (of 8) drawn fresh, each head's QK / OV factors re-balanced
    (equal Grams, 1e-4 relative), scores scaled by 1/sqrt(4); recompose folds that scaling into the query, so the
    vanilla model computes the same outputs (1e-5 relative)."""
    from fnl_transformers.hf import recompose

    model = patch_model(
        tiny(arch), FNLConfig(head_dim=4, reduced_heads="fresh", spectral_init_qk=True, spectral_init_ov=True)
    )
    entry = plan_of(model).attention
    assert {e.score_dim for e in entry.values()} == {4} and {e.init_qk for e in entry.values()} == {"balanced"}
    owner = model.bert.encoder.layer[0].attention.self if arch == "bert" else model.transformer.h[0].attn
    assert owner.scaling == pytest.approx(4**-0.5)
    if arch == "bert":
        q, k = owner.query.weight.detach().view(4, 4, -1), owner.key.weight.detach().view(4, 4, -1)
        ga, gb = q @ q.transpose(1, 2), k @ k.transpose(1, 2)
        assert float((ga - gb).norm()) <= 1e-4 * float(ga.norm())
    batch = inputs(model)
    vanilla = recompose(model)
    owner = vanilla.bert.encoder.layer[0].attention.self if arch == "bert" else vanilla.transformer.h[0].attn
    assert owner.scaling == pytest.approx(8**-0.5)
    assert rel_diff(outputs(vanilla, batch), outputs(model, batch)) < 1e-5


# --- refusals -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, cause",
    [
        (
            dict(head_dim=4),
            r"head_dim=4 \(both attention forms\) changes the QK heads \(8 dims\): give head_dim_ov=4 "
            r"instead to shrink the OV forms alone",
        ),
        (dict(head_dim_qk=4), r"head_dim_qk=4 changes the QK heads \(8 dims\): drop head_dim_qk"),
        (
            dict(rank_scale=0.5, factorize=("ffn", "attention")),
            r"rank_scale=0.5 with 'attention' in factorize \(QK heads to 4 dims\) changes the QK heads \(8 dims\): "
            r"drop 'attention' from factorize",
        ),
        (dict(spectral_init_qk=True), r"spectral_init_qk=True changes the QK heads \(8 dims\): drop spectral_init_qk"),
    ],
)
def test_llama_qk_head_change_is_refused_under_rope_naming_what_was_set(settings, cause):
    with pytest.raises(ValueError, match=r"rotary position embeddings .*; " + cause):
        patch_model(tiny("llama_mha"), FNLConfig(**settings))


def test_gqa_ov_head_shrinking_is_refused():
    with pytest.raises(ValueError, match="grouped-query attention"):
        patch_model(tiny("llama"), FNLConfig(head_dim_ov=4))


def test_value_bias_without_output_bias_refuses_ov_shrinking():
    with pytest.raises(ValueError, match="value bias can only be folded into an output bias"):
        patch_model(tiny("qwen2"), FNLConfig(head_dim_ov=4))


def test_head_dim_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match=r"head_dim_qk 9 does not fit .*dimension 8.*\[1, 8\]"):
        patch_model(tiny("bert"), FNLConfig(head_dim=9))


def test_unsupported_architecture_lists_supported_ones():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(
        OPTConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    )
    with pytest.raises(ValueError, match=r"model_type 'opt'.*bert, distilbert, gpt2, llama, mistral, qwen2, roberta"):
        patch_model(model, FNLConfig())


def test_patching_twice_is_refused():
    model = patch_model(tiny("bert"), FNLConfig(rank_scale=0.5))
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, FNLConfig(rank_scale=0.5))


def test_default_config_only_registers_forms():
    model = tiny("gpt2")
    before = {n: p.clone() for n, p in model.named_parameters()}
    patch_model(model, FNLConfig())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    kinds = {k for _, _, k in form_parameters(model)}
    assert kinds == {"qk", "ov"}


def test_optimizer_groups_find_the_registered_forms():
    """Decoupled FD (optim.param_groups) sees the shrunk fused GPT-2 projections and the factorized layers;
    one AdamWFD step with only FD (zero gradients, lr 1) moves each factor by -lr * lambda * dFD/dfactor."""
    from fnl_transformers.core import fd_grads
    from fnl_transformers.optim import AdamWFD, param_groups

    cfg = FNLConfig(
        rank_scale=0.5,
        head_dim_qk=3,
        head_dim_ov=5,
        fd_linear=0.1,
        fd_embedding=0.1,
        fd_qk=0.1,
        fd_ov=0.1,
        fd_mode="decoupled",
    )
    model = patch_model(tiny("gpt2"), cfg)
    fd = {f"fd_{k}": v for k, v in cfg.fd.coefficients().items()}
    groups = param_groups(model, **fd)
    names = {id(p): n for n, p in model.named_parameters()}
    fd_group = next(g for g in groups if g.get("fd_forms"))
    in_fd = {names[id(p)] for p in fd_group["params"]}
    assert {
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.U",
        "transformer.wte.V",
    } <= in_fd
    expected = fd_grads(model, **cfg.fd.coefficients())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = AdamWFD(groups, lr=1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, g in expected.items():
        moved = before[name] - dict(model.named_parameters())[name].detach()
        assert torch.allclose(moved, g, rtol=1e-5, atol=1e-7), name


def test_a_refused_plan_leaves_the_model_untouched():
    model = tiny("bert")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="match no layer"):
        patch_model(model, FNLConfig(head_dim=4, rank_scale=0.5, ranks={"*.nothing": 2}))
    with pytest.raises(ValueError, match="unreachable"):
        patch_model(model, FNLConfig(head_dim=4, target_param_ratio=0.05, factorize=("ffn",)))
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in before.items()}
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not hasattr(model.config, "fnl_config")


def test_patching_does_not_touch_other_models_sharing_the_config():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=48, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    first, second = BertForMaskedLM(cfg), BertForMaskedLM(cfg)
    patch_model(first, FNLConfig(rank_scale=0.5))
    assert not hasattr(cfg, "fnl_config") and not hasattr(second.config, "fnl_config")
    assert all(m.config is first.config for m in first.modules() if "config" in m.__dict__)
    patch_model(second, FNLConfig(head_dim=4))  # not "already patched"


@pytest.mark.parametrize("arch,qk,ov", [("gpt2", 3, 5), ("llama_mha", 8, 3)])
def test_generation_with_kv_cache_after_shrinking(arch, qk, ov):
    """Cached decoding with padded per-head widths gives the unpatched model's tokens (exact-rank heads)."""
    model = tiny(arch)
    make_heads_rank_deficient(model, qk, ov)
    patched = patch_model(copy.deepcopy(model), FNLConfig(head_dim_qk=qk, head_dim_ov=ov))
    ids = torch.tensor([[5, 7, 9]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **kw), model.generate(ids, **kw))
