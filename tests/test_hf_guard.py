"""Marked checkpoints: every plain-transformers loading route refuses with the pointer to
``fnl_transformers.hf.from_pretrained``; that loader restores the model exactly (0 difference: same float32 weights).

Routes tried (each on a rank-only and on a head-shrunk checkpoint): ``AutoModel*`` with and without
``attn_implementation``, ``dtype``/``torch_dtype``, ``device_map``, ``use_safetensors=False``; the concrete class;
``from_pretrained(dir, config=...)`` with the checkpoint's own config and with a foreign one; ``pipeline``;
a head of another task (``AutoModelForSequenceClassification``); sentence-transformers.
"""

import json
import os
import shutil

import pytest
import torch
import transformers as tf

from fnl_transformers.hf import FNLConfig, from_pretrained, guard, patch_model

from hf_patch_helpers import inputs, minilm_dir, outputs, tiny

POINTED = "fnl_transformers.hf.from_pretrained(path)"  # in every refusal


@pytest.fixture(scope="module", params=["rank", "heads"])
def marked(request, tmp_path_factory):
    config = FNLConfig(rank_scale=0.5) if request.param == "rank" else FNLConfig(rank_scale=0.5, head_dim=4)
    model = patch_model(tiny("bert"), config)
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    model.save_pretrained(path)
    guard.mark_checkpoint(path)
    return str(path), model


ROUTES = {
    "AutoModel": lambda d: tf.AutoModel.from_pretrained(d),
    "AutoModel sdpa": lambda d: tf.AutoModel.from_pretrained(d, attn_implementation="sdpa"),
    "AutoModel eager": lambda d: tf.AutoModel.from_pretrained(d, attn_implementation="eager"),
    "AutoModel dtype": lambda d: tf.AutoModel.from_pretrained(d, dtype=torch.float32),
    "AutoModel torch_dtype": lambda d: tf.AutoModel.from_pretrained(d, torch_dtype="auto"),
    "AutoModel device_map": lambda d: tf.AutoModel.from_pretrained(d, device_map="cpu"),
    "AutoModel use_safetensors=False": lambda d: tf.AutoModel.from_pretrained(d, use_safetensors=False),
    "AutoModelForMaskedLM": lambda d: tf.AutoModelForMaskedLM.from_pretrained(d),
    "AutoModelForMaskedLM sdpa": lambda d: tf.AutoModelForMaskedLM.from_pretrained(d, attn_implementation="sdpa"),
    "AutoModelForSequenceClassification": lambda d: tf.AutoModelForSequenceClassification.from_pretrained(d),
    "BertForMaskedLM": lambda d: tf.BertForMaskedLM.from_pretrained(d),
    "BertForMaskedLM sdpa": lambda d: tf.BertForMaskedLM.from_pretrained(d, attn_implementation="sdpa"),
    "config= own": lambda d: tf.AutoModelForMaskedLM.from_pretrained(d, config=tf.AutoConfig.from_pretrained(d)),
    "config= foreign": lambda d: tf.BertForMaskedLM.from_pretrained(d, config=tiny("bert").config),
    "config= foreign sdpa": lambda d: tf.AutoModelForMaskedLM.from_pretrained(
        d, config=tiny("bert").config, attn_implementation="sdpa"
    ),
    "pipeline": lambda d: tf.pipeline("fill-mask", model=d, tokenizer=minilm_dir()),
    "pipeline sdpa": lambda d: tf.pipeline(
        "feature-extraction", model=d, tokenizer=minilm_dir(), model_kwargs={"attn_implementation": "sdpa"}
    ),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_plain_transformers_refuses_with_the_pointer(marked, route):
    path, _ = marked
    with pytest.raises((ValueError, OSError)) as info:
        ROUTES[route](path)
    assert POINTED in str(info.value), str(info.value)[:300]


def test_fnl_loader_restores_the_marked_checkpoint(marked):
    path, model = marked
    assert guard.is_marked(path)
    reloaded = from_pretrained(path)
    batch = inputs(model)
    assert torch.equal(outputs(reloaded, batch), outputs(model.eval(), batch))
    assert "transformers_weights" not in reloaded.config.to_dict() and guard.GUARD_KEY not in reloaded.config.to_dict()


def test_marked_layout_and_idempotence(tmp_path):
    model = patch_model(tiny("bert"), FNLConfig(rank_scale=0.5))
    model.save_pretrained(tmp_path)
    guard.mark_checkpoint(tmp_path)
    guard.mark_checkpoint(tmp_path)  # a second mark changes nothing
    assert sorted(os.listdir(tmp_path)) == ["config.json", "fnl_model.safetensors", "model.safetensors.index.json"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["transformers_weights"] == guard.POINTER
    assert config[guard.GUARD_KEY] == {"format": guard.FORMAT, "weights": "fnl_model.safetensors"}
    decoy = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert list(decoy["weight_map"].values()) == [guard.DECOY_SHARD]
    assert not os.path.exists(tmp_path / guard.DECOY_SHARD)
    clean, state = guard.read_checkpoint(tmp_path)
    assert "transformers_weights" not in clean and guard.GUARD_KEY not in clean and "fnl_config" in clean
    # every weight but the decoder bias tied to cls.predictions.bias (save_pretrained stores tied tensors once)
    assert set(model.state_dict()) - set(state) == {"cls.predictions.decoder.bias"} and set(state) <= set(
        model.state_dict()
    )
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if k in state)


def test_sharded_checkpoint_is_marked_and_reloads(tmp_path):
    model = patch_model(tiny("gpt2"), FNLConfig(rank_scale=0.5))
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [n for n in os.listdir(tmp_path) if n.startswith("model-")]
    assert len(shards) > 1
    guard.mark_checkpoint(tmp_path)
    assert os.path.isfile(tmp_path / "fnl_model.safetensors.index.json")
    with pytest.raises(ValueError, match=r"fnl_transformers\.hf\.from_pretrained\(path\)"):
        tf.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager")
    with pytest.raises(OSError, match=r"fnl_transformers\.hf\.from_pretrained\(path\)"):
        tf.GPT2LMHeadModel.from_pretrained(tmp_path, config=tiny("gpt2").config)
    batch = inputs(model)
    assert torch.equal(outputs(from_pretrained(tmp_path), batch), outputs(model.eval(), batch))


def test_every_save_of_a_patched_model_is_marked(tmp_path):
    """The patched model's own save_pretrained marks (also for copies and reloaded models); recomposed models
    save plainly; push_to_hub=True (an upload before the marks) is refused."""
    import copy

    from fnl_transformers.hf import recompose

    model = patch_model(tiny("bert"), FNLConfig(rank_scale=0.5))
    for i, m in enumerate((model, copy.deepcopy(model))):
        m.save_pretrained(tmp_path / f"s{i}")
        assert guard.is_marked(tmp_path / f"s{i}")
        with pytest.raises(ValueError, match=POINTED.replace("(", r"\(").replace(")", r"\)")):
            tf.AutoModelForMaskedLM.from_pretrained(tmp_path / f"s{i}")
    from_pretrained(tmp_path / "s0").save_pretrained(tmp_path / "again")
    assert guard.is_marked(tmp_path / "again")
    recompose(model).save_pretrained(tmp_path / "plain")
    assert not guard.is_marked(tmp_path / "plain") and os.path.isfile(tmp_path / "plain" / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"push_to_hub=True\) would upload a patched checkpoint before .* "
        r"model\.push_to_hub\(repo_id\)",
    ):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)


def test_unmarked_checkpoints_still_load(tmp_path):
    model = patch_model(tiny("bert"), FNLConfig(rank_scale=0.5))
    type(model).save_pretrained(model, tmp_path)  # transformers' own save: the layout of earlier versions
    assert not guard.is_marked(tmp_path)
    batch = inputs(model)
    assert torch.equal(outputs(from_pretrained(tmp_path), batch), outputs(model.eval(), batch))


def test_corrupted_or_missing_weights_name_the_file(tmp_path):
    model = patch_model(tiny("bert"), FNLConfig(rank_scale=0.5))
    model.save_pretrained(tmp_path)
    guard.mark_checkpoint(tmp_path)
    weights = tmp_path / "fnl_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=r"fnl_model\.safetensors is not a readable safetensors file"):
        from_pretrained(tmp_path)
    weights.write_text("not a tensor file\n")
    with pytest.raises(ValueError, match=r"fnl_model\.safetensors is not a readable safetensors file"):
        from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="has no fnl_model.safetensors"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        guard.mark_checkpoint(tmp_path)


def test_sentence_transformers_refuses_a_marked_minilm(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    src = minilm_dir()
    out = tmp_path / "minilm"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("model.safetensors"))
    os.remove(out / "config.json")
    model = patch_model(tf.AutoModel.from_pretrained(src), FNLConfig(rank_scale=0.5, head_dim=16))
    model.save_pretrained(out)
    guard.mark_checkpoint(out)
    with pytest.raises((ValueError, OSError)) as info:
        st.SentenceTransformer(str(out), device="cpu")
    assert POINTED in str(info.value)
