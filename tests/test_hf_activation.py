"""Activation-aware ``patch_model``: each layer and head form gets exactly the core's activation-aware truncation on
the statistics of the vanilla model (float32 factors compared to 1e-5 relative), the errors recorded in the plan
are the core's, and calibration mistakes are one clear error or warning. Tiny random BERT with MiniLM's tokenizer
(calibration texts need a real tokenizer)."""

import copy
import warnings

import pytest
import transformers as tf
from hf_text_helpers import CALIBRATION

from fnl_transformers.core import HeadDims, shrink_heads_with_errors, spectral_init
from fnl_transformers.core.activation import (
    HeadCalibration,
    activation_init,
    embedding_activation_init,
)
from fnl_transformers.hf import FNLConfig, from_pretrained, patch_model
from fnl_transformers.hf.arch import arch_for
from fnl_transformers.hf.calibration import collect_input_stats
from fnl_transformers.hf.report import format_table

from hf_patch_helpers import minilm_dir, outputs, rel_diff, tiny

TEXTS = CALIBRATION[:8]
CONFIG = FNLConfig(rank_scale=0.5, head_dim=4, activation_aware=True, damping=0.05)
FFN = "bert.encoder.layer.1.intermediate.dense"
EMB = "bert.embeddings.word_embeddings"
ATT = "bert.encoder.layer.0.attention"


@pytest.fixture(scope="module")
def setup():
    tok = tf.AutoTokenizer.from_pretrained(minilm_dir())
    vanilla = tiny("bert", vocab_size=tok.vocab_size)
    stats = collect_input_stats(vanilla, tok, TEXTS, attention=[ATT, "bert.encoder.layer.1.attention"])
    patched = patch_model(copy.deepcopy(vanilla), CONFIG, calibration=(tok, TEXTS))
    return tok, vanilla, stats, patched


def _close(a, b, rtol=1e-5):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm()) <= rtol * float(b.norm())


def test_layers_are_the_core_activation_aware_truncation(setup):
    _, vanilla, stats, patched = setup
    plan = patched.config.fnl_config
    W = vanilla.get_submodule(FFN).weight.detach()
    U, V, fit = activation_init(W, 16, stats[FFN].second_moment, damping=0.05)
    assert _close(patched.get_submodule(FFN).product(), U @ V.T)
    assert plan["layers"][FFN]["fit"] == pytest.approx(fit.as_dict(), rel=1e-9)
    assert plan["layers"][FFN]["rel_error"] == pytest.approx(fit.weight_rel_error, rel=1e-4)
    E = vanilla.get_submodule(EMB).weight
    U, V, fit = embedding_activation_init(E, 16, stats[EMB].counts, damping=0.05)
    assert _close(patched.get_submodule(EMB).product(), U @ V.T)
    assert plan["layers"][EMB]["fit"] == pytest.approx(fit.as_dict(), rel=1e-9)
    # the minimized objective is below weight-only SI's on the same layer's calibration outputs
    C = stats[FFN].second_moment.float()
    Us, Vs = spectral_init(W, 16)

    def out_err(P):
        D = (W - P).double()
        return float(((D @ C.double()) * D).sum() / ((W.double() @ C.double()) * W.double()).sum()) ** 0.5

    assert out_err(patched.get_submodule(FFN).product().detach()) < out_err(Us @ Vs.T)


def test_heads_are_the_core_activation_aware_per_head_truncation(setup):
    _, vanilla, stats, patched = setup
    arch = arch_for(vanilla)
    dims = HeadDims(4, 4, 8, 4, 4)
    q = stats[f"{ATT}.{arch.q}"]
    cal = HeadCalibration(q.second_moment, q.mean, stats[ATT].second_moment, 0.05)
    ref, fits = shrink_heads_with_errors(
        arch.read(vanilla.get_submodule(ATT), dims.full), dims, "activation", "activation", calibration=cal
    )
    got = arch.read(patched.get_submodule(ATT), dims)
    for key in ("q_weight", "q_bias", "k_weight", "v_weight", "o_weight", "o_bias"):
        assert _close(got[key], ref[key]), key
    entry = patched.config.fnl_config["attention"][ATT]
    assert entry["init_qk"] == entry["init_ov"] == "activation"
    assert entry["qk_fit"] == pytest.approx(fits["qk"].as_dict(), rel=1e-9)
    assert entry["ov_fit"] == pytest.approx(fits["ov"].as_dict(), rel=1e-9)
    assert entry["qk_rel_error"] == pytest.approx(fits["qk"].weight_rel_error, rel=1e-4)


def test_precomputed_statistics_table_and_reload(setup, tmp_path):
    tok, vanilla, stats, patched = setup
    again = patch_model(copy.deepcopy(vanilla), CONFIG, calibration=stats)
    batch = tok(TEXTS[:2], return_tensors="pt", padding=True)
    assert rel_diff(outputs(again, batch), outputs(patched, batch)) < 1e-5
    table = format_table(patched.config.fnl_config)
    assert "output error" in table.splitlines()[0] and "activation-aware truncation" in table
    patched.save_pretrained(tmp_path)
    assert rel_diff(outputs(from_pretrained(tmp_path), batch), outputs(patched, batch)) < 1e-5


def test_calibration_mistakes_are_one_clear_error_or_warning(setup):
    tok, vanilla, stats, _ = setup
    with pytest.raises(ValueError, match=r"activation_aware=True .* pass patch_model\(model, config, calibration="):
        patch_model(copy.deepcopy(vanilla), CONFIG)
    with pytest.raises(ValueError, match=r"calibration data is used by activation-aware truncation only"):
        patch_model(copy.deepcopy(vanilla), FNLConfig(rank_scale=0.5), calibration=(tok, TEXTS))
    with pytest.raises(TypeError, match=r"calibration must be \(tokenizer, texts\)"):
        patch_model(copy.deepcopy(vanilla), CONFIG, calibration=TEXTS)
    with pytest.raises(TypeError, match=rf"statistics of the layer {FFN} must be its input statistics"):
        patch_model(copy.deepcopy(vanilla), CONFIG, calibration={**stats, FFN: stats[EMB]})
    partial = {k: v for k, v in stats.items() if k != FFN}
    with pytest.warns(UserWarning, match=rf"no calibration statistics for {FFN} .*weight-only SI there"):
        model = patch_model(copy.deepcopy(vanilla), CONFIG, calibration=partial)
    U, V = spectral_init(vanilla.get_submodule(FFN).weight, 16)
    assert _close(model.get_submodule(FFN).product(), U @ V.T)
    assert model.config.fnl_config["layers"][FFN]["fit"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer reached: no warning
        patch_model(copy.deepcopy(vanilla), CONFIG, calibration=stats)
