"""Save / reload / recompose round trips of patched models, and loud failures of wrong loading.

Tolerances: a reloaded patched model reproduces the saved one exactly (same float32 weights: 0 difference);
recomposed (multiplied-out, zero-padded) models agree with the patched ones to 1e-5 relative.
"""

import json

import pytest
import torch

from fnl_transformers.core import FactorizedLinear, form_parameters
from fnl_transformers.hf import FNLConfig, from_pretrained, patch_model, recompose
from fnl_transformers.hf.layers import TiedFactorizedHead

from hf_patch_helpers import inputs, outputs, rel_diff, tiny

CASES = {  # arch -> config exercising its special cases
    "bert": FNLConfig(rank_scale=0.5, head_dim=4, fd_qk=1e-3),
    "roberta": FNLConfig(rank_scale=0.5, head_dim_qk=3, head_dim_ov=5),
    "distilbert": FNLConfig(rank_scale=0.5, head_dim_qk=6, head_dim_ov=2, deep=True),
    "gpt2": FNLConfig(rank_scale=0.5, head_dim_qk=3, head_dim_ov=5),
    "llama": FNLConfig(rank_scale=0.5),
    "llama_mha": FNLConfig(head_dim_ov=3, ranks={"*.mlp.down_proj": 5}, factorize=("ffn",)),
    "llama_tied": FNLConfig(rank_scale=0.5, head_dim_ov=5),
    "mistral": FNLConfig(rank_scale=0.5, head_dim_ov=5),
    "qwen2": FNLConfig(rank_scale=0.5),
}


def _perturb(model):
    """Move every parameter a little, as training would (deep M away from the identity, biases, etc.)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


@pytest.mark.parametrize("arch", list(CASES))
def test_save_reload_recompose_round_trip(arch, tmp_path):
    model = tiny(arch)
    batch = inputs(model)
    patched = patch_model(model, CASES[arch])
    _perturb(patched)
    expected = outputs(patched, batch)
    patched.save_pretrained(tmp_path / "patched")

    reloaded = from_pretrained(tmp_path / "patched")
    assert type(reloaded) is type(patched)
    assert not reloaded.training
    sd, sd2 = patched.state_dict(), reloaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(outputs(reloaded, batch), expected)
    assert [(n, k) for n, _, k in form_parameters(reloaded)] == [(n, k) for n, _, k in form_parameters(patched)]
    assert reloaded.fnl_config == CASES[arch]

    vanilla = recompose(reloaded)
    assert rel_diff(outputs(vanilla, batch), expected) < 1e-5
    assert not any(isinstance(m, (FactorizedLinear, TiedFactorizedHead)) for m in vanilla.modules())
    assert reloaded.config.fnl_config  # recompose leaves its input patched
    vanilla.save_pretrained(tmp_path / "vanilla")
    plain, info = type(model).from_pretrained(tmp_path / "vanilla", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert rel_diff(outputs(plain.eval(), batch), expected) < 1e-5
    fresh = tiny(arch)  # the recomposed checkpoint has exactly the original architecture's names and shapes
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    with open(tmp_path / "vanilla" / "config.json") as f:
        saved = json.load(f)
    assert "fnl_config" not in saved and "attn_implementation" not in saved


def test_tied_weights_stay_tied_through_save_and_recompose(tmp_path):
    patched = patch_model(tiny("gpt2"), FNLConfig(rank_scale=0.5))
    patched.save_pretrained(tmp_path / "p")
    reloaded = from_pretrained(tmp_path / "p")
    assert reloaded.lm_head.embedding is reloaded.transformer.wte
    vanilla = recompose(reloaded)
    assert vanilla.lm_head.weight is vanilla.transformer.wte.weight
    bert = recompose(patch_model(tiny("bert"), FNLConfig(rank_scale=0.5)))
    dec = bert.cls.predictions.decoder
    assert dec.weight is bert.bert.embeddings.word_embeddings.weight and dec.bias is bert.cls.predictions.bias


def test_a_plan_saved_in_the_former_format_still_loads(tmp_path):
    """config.json written before the settings model (plan format 1: ``qk_head_dim``/``ov_head_dim``, fd_embedding
    0.0, no init records) reloads to the same model; an unknown format is one clear error."""
    patched = patch_model(
        tiny("bert"), FNLConfig(rank_scale=0.5, head_dim_qk=3, head_dim_ov=5, fd_qk=1e-3, fd_embedding=0.0)
    )
    batch = inputs(patched)
    patched.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    config = json.loads(path.read_text())
    plan = config["fnl_config"]
    plan["format"] = 1
    plan["config"] = {
        ("qk_head_dim" if k == "head_dim_qk" else "ov_head_dim" if k == "head_dim_ov" else k): v
        for k, v in plan["config"].items()
        if k not in ("spectral_init_qk", "spectral_init_ov", "weight_decay_factors")
    }
    for entry in plan["attention"].values():
        entry["qk_head_dim"], entry["ov_head_dim"] = entry.pop("head_dim_qk"), entry.pop("head_dim_ov")
        del entry["init_qk"], entry["init_ov"]
    path.write_text(json.dumps(config))
    reloaded = from_pretrained(tmp_path / "old")
    assert torch.equal(outputs(reloaded, batch), outputs(patched.eval(), batch))
    assert reloaded.fnl_config.head_dim_qk == 3 and reloaded.fnl_config.fd == patched.fnl_config.fd
    plan["format"] = 7
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"fnl_config format 7 / arch 'bert' is not one this fnl_transformers reads"):
        from_pretrained(tmp_path / "old")


def test_plain_transformers_loading_of_a_patched_checkpoint_fails_loudly(tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM, BertForMaskedLM, pipeline

    patch_model(tiny("bert"), FNLConfig(rank_scale=0.5)).save_pretrained(tmp_path)
    for load in (
        AutoModelForMaskedLM.from_pretrained,
        AutoModel.from_pretrained,
        BertForMaskedLM.from_pretrained,
        lambda p: pipeline("fill-mask", model=p),
    ):
        with pytest.raises(ValueError, match=r"fnl_transformers\.hf\.from_pretrained"):
            load(str(tmp_path))


def test_patched_checkpoint_with_missing_or_foreign_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    patch_model(tiny("bert"), FNLConfig(rank_scale=0.5)).save_pretrained(tmp_path)
    path = tmp_path / "fnl_model.safetensors"  # marked: the weights moved
    state = load_file(path)
    del state["bert.encoder.layer.1.output.dense.U"]
    state["bert.encoder.layer.1.output.dense.weight"] = torch.zeros(32, 64)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(
        ValueError,
        match=r"missing: bert\.encoder\.layer\.1\.output\.dense\.U.*"
        r"unexpected: bert\.encoder\.layer\.1\.output\.dense\.weight",
    ):
        from_pretrained(tmp_path)


def test_checkpoint_from_a_different_configuration_is_refused(tmp_path):
    """Weights of a rank-16 model under a plan that says rank 8: shape mismatch, named."""
    from safetensors.torch import load_file, save_file

    patch_model(tiny("bert"), FNLConfig(rank_scale=0.5)).save_pretrained(tmp_path / "a")
    patch_model(tiny("bert"), FNLConfig(rank_scale=0.25)).save_pretrained(tmp_path / "b")
    save_file(
        load_file(tmp_path / "a" / "fnl_model.safetensors"),
        tmp_path / "b" / "fnl_model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match="shape mismatch: bert.embeddings.word_embeddings.U"):
        from_pretrained(tmp_path / "b")


def test_from_pretrained_rejects_vanilla_and_missing_directories(tmp_path):
    tiny("bert").save_pretrained(tmp_path / "v")
    with pytest.raises(ValueError, match="not a fnl_transformers checkpoint"):
        from_pretrained(tmp_path / "v")
    with pytest.raises(FileNotFoundError):
        from_pretrained(tmp_path / "nowhere")


def test_recompose_requires_a_patched_model():
    with pytest.raises(ValueError, match="not patched"):
        recompose(tiny("bert"))


def test_deep_factors_are_multiplied_out_after_training():
    """Teacher-free distillation: U M V^T (M trained away from the identity) becomes one dense weight."""
    model = patch_model(tiny("distilbert"), FNLConfig(rank_scale=1.0, deep=True))
    _perturb(model)
    layer = model.distilbert.transformer.layer[0].ffn.lin1
    vanilla = recompose(model)
    dense = vanilla.distilbert.transformer.layer[0].ffn.lin1
    assert isinstance(dense, torch.nn.Linear)
    expected = (layer.U.double() @ layer.M.double() @ layer.V.double().t()).float()
    assert torch.allclose(dense.weight, expected, atol=1e-6)


def test_patched_model_trains_and_stays_consistent(tmp_path):
    """A few SGD steps on a patched GPT-2 (tied factorized embedding, shrunk heads), then a round trip."""
    model = patch_model(tiny("gpt2"), FNLConfig(rank_scale=0.5, head_dim=4)).train()
    batch = inputs(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(tmp_path)
    assert torch.equal(outputs(from_pretrained(tmp_path), batch), outputs(model, batch))
    assert rel_diff(outputs(recompose(model), batch), outputs(model, batch)) < 1e-5


def test_reload_keeps_the_saved_dtype(tmp_path):
    model = patch_model(tiny("llama_mha"), FNLConfig(rank_scale=0.5, head_dim_ov=4)).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    reloaded = from_pretrained(tmp_path)
    assert reloaded.model.layers[0].mlp.up_proj.U.dtype == torch.bfloat16
    sd, sd2 = model.state_dict(), reloaded.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert from_pretrained(tmp_path, dtype=torch.float32).lm_head.U.dtype == torch.float32
