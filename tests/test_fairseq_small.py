"""``fnl_transformer_small``: the paper's IWSLT-14 model (the official ``transformer_small``) and its compression by
one rank scale with the official rules.

* The dense model: 2 + 2 pre-norm layers with final layer norms, d 256, FFN 1024, 4 heads of 64, learned
  positions, no embedding scaling, separate embeddings, untied output projection, no projection biases, the
  official dropouts and initialization; its parameter count equals a formula written here.
* Compressed at R = 0.25 and R = 0.5 (``--factorize ffn,embedding,position,attention``): every factorized layer
  has rank ``round(R min(m, n))`` (the official ``FactorizedLinear`` rule) and every head
  ``key_dim / heads = int(R * 256 / 4)`` (the official ``MultiheadAttention`` rule), SI's error equals the tail
  singular energy of the dense layer (Eckart-Young; float32 SVD, 1e-4 relative), the fresh reduced heads are
  re-balanced (``A_h^T A_h = B_h^T B_h``, 1e-4 relative) and scored by ``1/sqrt(reduced head dim)``, and the
  parameter count equals the compressed formula.
* ``recipes/iwslt14/train.sh baseline --dry-run`` names this model and its command builds it.
* Without SI, ``--factor-init dense`` draws each factor from the dense layer's own initialization (linear
  factors in [-0.1, 0.1], embedding factors with std 0.1 within 10%: 5 standard errors of the smallest factor).
"""

from __future__ import annotations

import pytest
import torch

from fairseq_helpers import build_model, make_tiny_data, user_dir

pytest.importorskip("fairseq")

from fairseq.modules import LearnedPositionalEmbedding  # noqa: E402

from fnl_transformers.core import tail_energy  # noqa: E402

D, FFN, HEADS, LAYERS, POSITIONS = 256, 1024, 4, 2, 1024  # 1022 positions + padding offset (padding_idx 1)


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


def _argv(data_bin, *extra):
    """fairseq-train flags building fnl_transformer_small with its own defaults (dropout included)."""
    return [
        data_bin,
        "--task",
        "translation",
        "--source-lang",
        "src",
        "--target-lang",
        "tgt",
        "--arch",
        "fnl_transformer_small",
        "--user-dir",
        user_dir(),
        "--optimizer",
        "nag",
        "--lr",
        "0.25",
        "--seed",
        "1",
        "--cpu",
        "--criterion",
        "label_smoothed_cross_entropy",
        *extra,
    ]


def dense_params(v_src: int, v_tgt: int) -> int:
    """Parameters of the official transformer_small without biases in attention / FFN (stock fairseq's output
    projection has no bias either): embeddings, positions, per layer 4 d^2 per attention + 2 d f + 2 d per
    layer norm, a final layer norm per side, the untied output projection."""
    enc = v_src * D + POSITIONS * D + LAYERS * (4 * D * D + 2 * D * FFN + 2 * 2 * D) + 2 * D
    dec = v_tgt * D + POSITIONS * D + LAYERS * (2 * 4 * D * D + 2 * D * FFN + 3 * 2 * D) + 2 * D + v_tgt * D
    return enc + dec


def compressed_params(v_src: int, v_tgt: int, R: float) -> int:
    """The same with every factorized layer at r (m + n) parameters, r = round(R min(m, n)), and heads of
    dim int(R * 64) (q, k, v, o of 4 heads: 4 d (4 hd))."""
    r = lambda m, n: int(round(R * min(m, n))) * (m + n)  # noqa: E731
    attn = 4 * D * HEADS * int(R * D / HEADS)
    enc = r(v_src, D) + r(POSITIONS, D) + LAYERS * (attn + r(FFN, D) + r(D, FFN) + 4 * D) + 2 * D
    dec = r(v_tgt, D) + r(POSITIONS, D) + LAYERS * (2 * attn + r(FFN, D) + r(D, FFN) + 6 * D) + 2 * D + r(v_tgt, D)
    return enc + dec


def test_the_dense_model_is_the_official_transformer_small(data_bin):
    model, task, args = build_model(_argv(data_bin))
    v_src, v_tgt = len(task.source_dictionary), len(task.target_dictionary)
    enc, dec = model.encoder, model.decoder
    assert len(enc.layers) == len(dec.layers) == LAYERS
    assert enc.embed_tokens.weight.shape[1] == D and enc.embed_tokens is not dec.embed_tokens  # separate
    assert dec.output_projection.weight is not dec.embed_tokens.weight  # untied
    assert enc.embed_scale == dec.embed_scale == 1.0  # token + position added directly
    for side in (enc, dec):
        assert isinstance(side.embed_positions, LearnedPositionalEmbedding)
        assert side.embed_positions.weight.shape == (POSITIONS, D) and side.max_positions() == 1022
        assert side.layer_norm is not None  # the final layer norm of a pre-norm stack
        for layer in side.layers:
            assert layer.normalize_before and layer.fc1.weight.shape == (FFN, D) and layer.fc2.weight.shape == (D, FFN)
            assert layer.activation_dropout_module.p == 0.1
            attns = [layer.self_attn] + ([layer.encoder_attn] if side is dec else [])
            for attn in attns:
                assert (attn.num_heads, attn.head_dim) == (HEADS, 64) and attn.dropout_module.p == 0.0
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                    assert proj.bias is None and proj.weight.abs().max() <= 0.1  # U(-0.1, 0.1), no bias
            assert layer.fc1.bias is None and layer.fc2.bias is None
    assert enc.dropout_module.p == 0.2 and args.dropout == 0.2
    assert dec.output_projection.bias is None and dec.output_projection.weight.abs().max() <= 0.1
    assert abs(float(enc.embed_tokens.weight.detach()[2:].std()) - 0.1) < 0.005  # N(0, 0.1^2), padding row zero
    assert float(enc.embed_tokens.weight.detach()[1].abs().max()) == 0.0
    assert sum(p.numel() for p in model.parameters()) == dense_params(v_src, v_tgt)
    # the same batch gives finite log-probabilities (pre-norm forward with the plain attention path)
    src = torch.randint(4, v_src, (2, 5))
    out = model(src, torch.tensor([5, 5]), torch.randint(4, v_tgt, (2, 4)))[0]
    assert out.shape == (2, 4, v_tgt) and torch.isfinite(out).all()


ONE_KNOB = ["--factorize", "ffn,embedding,position,attention", "--factor-init", "dense", "--reduced-heads", "fresh"]


def _layers(model):
    """``(name, factorized layer)`` of every factorized layer."""
    from fnl_transformers.core import FactorizedEmbedding, FactorizedLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (FactorizedLinear, FactorizedEmbedding))]


@pytest.mark.parametrize("R", [0.25, 0.5])
def test_one_rank_scale_compresses_as_the_official_code(data_bin, R):
    dense, task, _ = build_model(_argv(data_bin))
    si = ["--spectral-init", "--spectral-init-qk", "--spectral-init-ov"]
    model, _, _ = build_model(_argv(data_bin, "--rank-scale", str(R), *ONE_KNOB, *si))
    v_src, v_tgt = len(task.source_dictionary), len(task.target_dictionary)
    layers = dict(_layers(model))
    expected = {f"{side}.{name}" for side in ("encoder", "decoder") for name in ("embed_tokens", "embed_positions")}
    expected |= {
        f"{side}.layers.{i}.{fc}" for side in ("encoder", "decoder") for i in range(LAYERS) for fc in ("fc1", "fc2")
    } | {"decoder.output_projection"}
    assert set(layers) == expected  # every linear and embedding layer the official code factorizes
    for name, layer in layers.items():
        W = dense.get_submodule(name).weight.detach()
        m, n = W.shape
        assert layer.rank == int(round(R * min(m, n))), name  # frob.py's FactorizedLinear rule
        err = float((layer.product() - W.float()).norm())
        tail = tail_energy(W, layer.rank)
        assert abs(err - tail) <= 1e-4 * float(W.norm()), (name, err, tail)  # SI = best rank-r approximation
    key_dim = int(R * D / HEADS) * HEADS  # the official MultiheadAttention's reduced key/value dims
    for name, attn in model.named_modules():
        if type(attn).__name__ != "ReducedHeadAttention":
            continue
        assert attn.q_proj.weight.shape == attn.k_proj.weight.shape == attn.v_proj.weight.shape == (key_dim, D)
        assert attn.out_proj.weight.shape == (D, key_dim)
        hd = key_dim // HEADS
        assert (attn.head_dim_qk, attn.head_dim_ov) == (hd, hd) and attn.scaling == pytest.approx(hd**-0.5)
        for a, b in ((attn.q_proj.weight, attn.k_proj.weight), (attn.out_proj.weight.t(), attn.v_proj.weight)):
            A, B = a.detach().view(HEADS, hd, D), b.detach().view(HEADS, hd, D)  # per head: rows of each factor
            ga, gb = A @ A.transpose(1, 2), B @ B.transpose(1, 2)  # re-balanced: equal Gram matrices
            assert float((ga - gb).norm()) <= 1e-4 * float(ga.norm()), name
    assert sum(p.numel() for p in model.parameters()) == compressed_params(v_src, v_tgt, R)


def test_without_si_each_factor_is_drawn_from_the_dense_init(data_bin):
    model, _, _ = build_model(_argv(data_bin, "--rank-scale", "0.5", *ONE_KNOB, "--no-spectral-init"))
    for name, layer in _layers(model):
        U, V = layer.U.detach(), layer.V.detach()
        if "embed" in name:  # N(0, 0.1^2) for both factors (the padding row of U zero)
            rows = U[2:] if layer.padding_idx == 1 else U
            for f in (rows, V):
                assert abs(float(f.std()) - 0.1) < 0.01, name
        else:  # U(-0.1, 0.1) for both factors: max close to the bound, std 0.1 / sqrt(3)
            for f in (U, V):
                assert float(f.abs().max()) <= 0.1 and float(f.abs().max()) > 0.095, name
                assert abs(float(f.std()) - 0.1 / 3**0.5) < 0.005, name


def test_the_recipe_trains_the_paper_model_by_default(data_bin):
    """``recipes/iwslt14/train.sh baseline --dry-run`` names the paper's model, and its command builds exactly it."""
    import shlex

    from recipes_helpers import RECIPES, run_script

    r = run_script(f"{RECIPES}/iwslt14/train.sh", "baseline", "--data", data_bin, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert (
        "# fnl_transformer_small: the paper's model (the official transformer_small): 2+2 pre-norm layers, d 256, "
        "FFN 1024, 4 heads of 64" in r.stderr
    )
    argv = shlex.split(r.stdout)[1:]
    model, task, args = build_model(argv)
    assert (args.arch, args.optimizer, args.lr, args.dropout, args.clip_norm) == (
        "fnl_transformer_small",
        "nag",
        [0.25],
        0.2,
        0.1,
    )
    v_src, v_tgt = len(task.source_dictionary), len(task.target_dictionary)
    assert sum(p.numel() for p in model.parameters()) == dense_params(v_src, v_tgt)
