"""Calibration statistics and output-level fidelity on the real MiniLM (offline) and tiny random models.

Tolerances: statistics are accumulated from float32 products, so they match float64 references to 1e-5 relative;
losses recomputed by transformers' own heads match to 1e-5. Comparisons of activation-aware truncation with
weight-only SI on MiniLM use margins well inside the observed factors (noted at each assertion).
"""

import copy

import pytest
import torch
import transformers as tf
from hf_text_helpers import CALIBRATION, HELD_OUT

from fnl_transformers.core import spectral_init
from fnl_transformers.core.activation import (
    HeadInputStats,
    InputStats,
    TokenCounts,
    activation_init,
    attention_activation_init,
)
from fnl_transformers.hf.calibration import check_texts, collect_input_stats, read_texts
from fnl_transformers.hf.fidelity import (
    embedding_cosine,
    fidelity_report,
    format_fidelity,
    lm_loss,
    mean_pooled,
    neighbour_agreement,
)

from hf_patch_helpers import minilm_dir, tiny


@pytest.fixture(scope="module")
def minilm():
    return tf.AutoModel.from_pretrained(minilm_dir()).eval(), tf.AutoTokenizer.from_pretrained(minilm_dir())


def _inputs_without_padding(model, tokenizer, texts, names):
    """Reference: each text alone (no padding), the inputs of the named modules captured by hooks."""
    seen = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: seen[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            for text in texts:
                model(**tokenizer(text, return_tensors="pt"))
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_stats_match_unpadded_inputs_and_token_counts(minilm):
    model, tok = minilm
    names = [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.key",
        "encoder.layer.3.output.dense",
        "pooler.dense",
    ]
    stats = collect_input_stats(model, tok, CALIBRATION[:10], batch_size=4)  # padded batches
    ref = _inputs_without_padding(model, tok, CALIBRATION[:10], names)
    for n in names:
        X = ref[n]
        assert isinstance(stats[n], InputStats) and stats[n].count == len(X), n
        assert torch.allclose(stats[n].second_moment, X.T @ X / len(X), rtol=1e-5, atol=1e-6), n
        assert torch.allclose(stats[n].mean, X.mean(0), rtol=1e-5, atol=1e-6), n
    ids = torch.cat([tok(t, return_tensors="pt")["input_ids"].flatten() for t in CALIBRATION[:10]])
    words = stats["embeddings.word_embeddings"]
    assert isinstance(words, TokenCounts)
    assert torch.equal(words.counts, torch.bincount(ids, minlength=model.config.vocab_size).double())
    assert stats["embeddings.position_embeddings"].count == len(ids)  # position ids shared by the batch
    assert not model.training


def test_stats_of_selected_modules_and_errors(minilm):
    model, tok = minilm
    stats = collect_input_stats(model, tok, CALIBRATION[:3], modules=["encoder.layer.1.output.dense"])
    assert list(stats) == ["encoder.layer.1.output.dense"]
    stats = collect_input_stats(model, tok, CALIBRATION[:3], modules=lambda n, m: n.endswith("intermediate.dense"))
    assert len(stats) == 6
    with pytest.raises(ValueError, match="not linear or embedding layers"):
        collect_input_stats(model, tok, CALIBRATION[:3], modules=["encoder.layer.1.output"])
    with pytest.raises(ValueError, match="single string"):
        collect_input_stats(model, tok, "one text")
    with pytest.raises(ValueError, match="no non-empty text"):
        check_texts(["", "  "])


def test_read_texts(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("first line\n\n  \nsecond line\n", encoding="utf-8")
    assert read_texts(str(path)) == ["first line", "second line"]
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="calibration file .* is not UTF-8 text"):
        read_texts(str(tmp_path / "bin.txt"))


def test_conv1d_and_tokenizer_without_pad_token(minilm):
    """GPT-2 (Conv1D layers, a causal LM) with a tokenizer that has no pad token: padding with unk, masked out."""
    _, tok = minilm
    tok = copy.deepcopy(tok)
    tok.pad_token = None
    model = tiny("gpt2", vocab_size=tok.vocab_size)
    stats = collect_input_stats(model, tok, CALIBRATION[:4], batch_size=2)
    ref = _inputs_without_padding(model, tok, CALIBRATION[:4], ["transformer.h.0.mlp.c_proj"])
    X = ref["transformer.h.0.mlp.c_proj"]
    assert stats["transformer.h.0.mlp.c_proj"].count == len(X)
    assert torch.allclose(stats["transformer.h.0.mlp.c_proj"].second_moment, X.T @ X / len(X), rtol=1e-5, atol=1e-6)


def test_activation_aware_beats_si_on_minilm_activations(minilm):
    """Real MiniLM FFN and attention inputs at a quarter of the rank: on the calibration activations the output
    error is optimal (it equals output_rel_error; observed 2-3x below SI's), and on held-out sentences it stays
    below SI's (observed factors 2.1 for intermediate.dense, 1.7 for the query projection, 1.4 for output.dense)."""
    model, tok = minilm
    names = [
        "encoder.layer.2.intermediate.dense",
        "encoder.layer.2.output.dense",
        "encoder.layer.4.attention.self.query",
    ]
    calib = collect_input_stats(model, tok, CALIBRATION, modules=names)
    held = collect_input_stats(model, tok, HELD_OUT, modules=names)
    for name, held_margin in zip(names, (1.5, 1.0, 1.3)):
        W = model.get_submodule(name).weight.detach().double()
        r = min(W.shape) // 4
        U, V, fit = activation_init(W, r, calib[name].second_moment)
        Us, Vs = spectral_init(W, r)

        def err(A, B, C, W=W):
            D = W - A.double() @ B.double().T
            return float(((D @ C) * D).sum() / ((W @ C) * W).sum()) ** 0.5

        assert err(U, V, calib[name].second_moment) == pytest.approx(fit.output_rel_error, rel=1e-9)
        assert err(U, V, calib[name].second_moment) < err(Us, Vs, calib[name].second_moment) / 1.5, name
        assert err(U, V, held[name].second_moment) < err(Us, Vs, held[name].second_moment) / held_margin, name


def test_minilm_heads_activation_aware_score_error(minilm):
    """Per-head QK truncation of a real MiniLM layer to 16 of 32 dims, measured on the attention scores of
    held-out sentences (per-query constants removed): below per-head SI's by a factor 1.5 (observed 2.8)."""
    from fnl_transformers.core import attention_spectral_init

    model, tok = minilm
    att = model.encoder.layer[1].attention
    q, k, v, o = att.self.query, att.self.key, att.self.value, att.output.dense
    name = "encoder.layer.1.attention.self.query"
    calib = collect_input_stats(model, tok, CALIBRATION, modules=[name])[name]
    w = dict(
        q_weight=q.weight,
        k_weight=k.weight,
        v_weight=v.weight,
        o_weight=o.weight,
        q_bias=q.bias,
        k_bias=k.bias,
        v_bias=v.bias,
        o_bias=o.bias,
    )
    w = {key: t.detach().double() for key, t in w.items()}
    act, _ = attention_activation_init(
        num_heads=12, second_moment=calib.second_moment, mean=calib.mean, qk_rank=16, **w
    )
    si = attention_spectral_init(num_heads=12, qk_rank=16, **w)
    X = _inputs_without_padding(model, tok, HELD_OUT[:4], [name])[name]

    def scores(t):
        Q = (X @ t["q_weight"].T + t["q_bias"]).reshape(len(X), 12, -1)
        K = (X @ t["k_weight"].T).reshape(len(X), 12, -1)
        s = torch.einsum("ihd,jhd->hij", Q, K)
        return s - s.mean(-1, keepdim=True)

    ref = scores(w)
    rel = lambda t: float((scores(t) - ref).norm() / ref.norm())  # noqa: E731
    assert rel(act) < rel(si) / 1.5


# ----------------------------------------------------------------------------------------------------------------
# fidelity
# ----------------------------------------------------------------------------------------------------------------
def test_fidelity_of_a_model_to_itself_and_to_a_perturbed_copy(minilm):
    model, tok = minilm
    same = fidelity_report(model, model, tok, HELD_OUT)
    assert same["texts"] == len(HELD_OUT) and same["lm_loss"] is None  # MiniLM has no LM head
    assert same["cosine"]["min"] > 1 - 1e-6 and same["neighbours"] == 1.0
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.std())
    report = fidelity_report(model, noisy, tok, HELD_OUT)
    assert report["cosine"]["min"] < 0.999 and 0 < report["cosine"]["mean"] < 1
    emb_a, emb_b = mean_pooled(model, tok, HELD_OUT), mean_pooled(noisy, tok, HELD_OUT)
    cos = torch.nn.functional.cosine_similarity(emb_a.double(), emb_b.double(), dim=1)
    assert report["cosine"]["per_text"] == pytest.approx(cos.tolist(), abs=1e-9)
    assert embedding_cosine(model, noisy, tok, HELD_OUT)["mean"] == pytest.approx(report["cosine"]["mean"], abs=1e-9)
    assert report["neighbours"] == neighbour_agreement(emb_a, emb_b)
    line = format_fidelity(report)
    assert line.startswith(f"output fidelity on {len(HELD_OUT)} texts: cosine of mean-pooled hidden states")


def test_mean_pooling_ignores_padding(minilm):
    model, tok = minilm
    batched = mean_pooled(model, tok, HELD_OUT[:5], batch_size=5)
    alone = torch.cat([mean_pooled(model, tok, [t]) for t in HELD_OUT[:5]])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_neighbour_agreement_hand_worked():
    a = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert neighbour_agreement(a, a) == 1.0
    b = torch.tensor([[1.0, 0.0], [0.1, 0.9], [0.0, 1.0], [0.9, 0.1]])  # rows 1 and 3 swapped: 0->3, 1->2, 2->1, 3->0
    assert neighbour_agreement(a, b) == 0.0
    assert neighbour_agreement(a[:2], b[:2]) is None


def test_masked_lm_loss_matches_transformers_and_is_reproducible(minilm):
    """The MLM loss equals the model's own loss (labels -100 except at the masked positions) on one unpadded
    text, and the same seed gives the same masks (two models compare on identical inputs)."""
    _, tok = minilm
    model = tiny("bert", vocab_size=tok.vocab_size)
    text = CALIBRATION[:1]
    ours = lm_loss(model, tok, text, seed=3)
    assert ours["kind"] == "mlm" and ours["tokens"] >= 1
    from fnl_transformers.hf.fidelity import _mask_tokens

    batch = {k: v for k, v in tok(text, return_tensors="pt").items()}
    masked, labels = _mask_tokens(batch, tok, torch.Generator().manual_seed(3), 0.15)
    with torch.no_grad():
        ref = model(**masked, labels=labels).loss
    assert ours["loss"] == pytest.approx(float(ref), rel=1e-5)
    assert lm_loss(model, tok, CALIBRATION[:6], seed=3) == lm_loss(model, tok, CALIBRATION[:6], seed=3)
    assert int((labels != -100).sum()) == ours["tokens"]
    assert bool((masked["input_ids"][labels != -100] == tok.mask_token_id).all())


def test_causal_lm_loss_matches_transformers(minilm):
    _, tok = minilm
    model = tiny("gpt2", vocab_size=tok.vocab_size)
    ours = lm_loss(model, tok, CALIBRATION[:1])
    batch = tok(CALIBRATION[:1], return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch, labels=batch["input_ids"]).loss
    assert ours["kind"] == "clm" and ours["loss"] == pytest.approx(float(ref), rel=1e-5)
    report = fidelity_report(model, model, tok, CALIBRATION[:4])
    assert report["lm_loss"]["kind"] == "clm"
    assert report["lm_loss"]["candidate"] == pytest.approx(report["lm_loss"]["reference"], rel=1e-9)
    assert "next-token loss" in format_fidelity(report)


def test_per_head_mixed_statistics_are_exact_for_the_ov_forms(minilm):
    """Each head's attention-weighted inputs z_h,i = sum_j a_h,ij x_j (recorded with eager attention, padded
    batches): their second moment matches texts run alone, and with it the reported OV output error equals the
    error of the truncated per-head OV outputs measured on those z (exact statistics; float32 sums: 1e-4)."""
    model, tok = minilm
    name = "encoder.layer.2.attention"
    stats = collect_input_stats(
        model, tok, CALIBRATION[:8], modules=["encoder.layer.2.attention.self.query"], attention=[name], batch_size=3
    )
    zs = []
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")  # the probabilities, for the reference
    handle = eager.get_submodule(name).register_forward_hook(
        lambda mod, args, kwargs, out: zs.append(
            torch.einsum("bhij,bjd->bihd", out[1], kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])[
                0
            ].double()
        ),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            for text in CALIBRATION[:8]:  # each text alone: no padding
                eager(**tok(text, return_tensors="pt"))
    finally:
        handle.remove()
    att = model.get_submodule(name)
    Z = torch.cat(zs)  # N x heads x d
    mixed = stats[name]
    assert isinstance(mixed, HeadInputStats) and mixed.count == len(Z)
    ref = torch.einsum("nhd,nhe->hde", Z, Z) / len(Z)
    assert torch.allclose(mixed.second_moment, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))

    q = stats["encoder.layer.2.attention.self.query"]
    w = {
        f"{k}_weight": lin.weight.detach().double()
        for k, lin in zip("qkvo", (att.self.query, att.self.key, att.self.value, att.output.dense))
    }
    out, errors = attention_activation_init(
        num_heads=12, second_moment=q.second_moment, mean=q.mean, ov_rank=8, ov_second_moment=mixed.second_moment, **w
    )
    heads = lambda o, v: o.reshape(384, 12, -1).permute(1, 0, 2) @ v.reshape(12, -1, 384)  # noqa: E731
    full, cut = heads(w["o_weight"], w["v_weight"]), heads(out["o_weight"].double(), out["v_weight"].double())
    y = torch.einsum("hod,nhd->nho", full, Z)  # each head's OV output on its own z_h
    y2 = torch.einsum("hod,nhd->nho", cut, Z)
    assert float((y - y2).norm() / y.norm()) == pytest.approx(errors["ov"].output_rel_error, rel=1e-4)
    assert model.config._attn_implementation == tf.AutoModel.from_pretrained(minilm_dir()).config._attn_implementation
    with pytest.raises(ValueError, match="are not modules of the model"):
        collect_input_stats(model, tok, CALIBRATION[:2], attention=["encoder.layer.9.attention"])
