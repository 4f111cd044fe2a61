"""``fnl_transformers.hf.from_pretrained`` options of transformers' loader: ``torch_dtype``/``dtype``,
``device_map`` (single device), Hub ids from the local cache (a fake cache built here; no network)."""

import os
import shutil

import pytest
import torch

from fnl_transformers.hf import FNLConfig, from_pretrained, guard, patch_model

from hf_patch_helpers import inputs, outputs, tiny


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = patch_model(tiny("bert"), FNLConfig(rank_scale=0.5, head_dim=4))
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    model.save_pretrained(path)
    guard.mark_checkpoint(path)
    return path, model.eval()


@pytest.mark.parametrize(
    "kwargs,dtype",
    [
        ({"torch_dtype": torch.bfloat16}, torch.bfloat16),
        ({"dtype": "float16"}, torch.float16),
        ({"torch_dtype": "bfloat16", "dtype": "bfloat16"}, torch.bfloat16),
        ({"dtype": "auto"}, torch.float32),
        ({}, torch.float32),
    ],
)
def test_dtype_and_its_alias_torch_dtype(saved, kwargs, dtype):
    path, _ = saved
    model = from_pretrained(path, **kwargs)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_dtype_errors(saved):
    path, _ = saved
    with pytest.raises(ValueError, match="give dtype or torch_dtype"):
        from_pretrained(path, dtype=torch.float16, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="floating torch dtype"):
        from_pretrained(path, dtype="int8")


@pytest.mark.parametrize("device_map", ["cpu", "auto", torch.device("cpu")])
def test_single_device_maps(saved, device_map):
    path, model = saved
    loaded = from_pretrained(path, device_map=device_map)
    expected = "cuda" if device_map == "auto" and torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in loaded.parameters()} == {expected}
    if expected == "cpu":
        batch = inputs(model)
        assert torch.equal(outputs(loaded, batch), outputs(model, batch))


def test_device_map_errors(saved):
    path, _ = saved
    with pytest.raises(ValueError, match="not supported; give one device"):
        from_pretrained(path, device_map={"": "cpu"})
    with pytest.raises(ValueError, match="device or device_map, not both"):
        from_pretrained(path, device="cpu", device_map="cpu")
    with pytest.raises(ValueError, match="device_map must be"):
        from_pretrained(path, device_map="gpu-please")


def _fake_cache(cache, repo_id, src, revision="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    shutil.copytree(src, root / "snapshots" / revision)
    return root / "snapshots" / revision


def test_hub_id_from_the_local_cache_offline(saved, tmp_path, monkeypatch):
    from huggingface_hub import constants

    path, model = saved
    cache = tmp_path / "hub"
    _fake_cache(cache, "someone/tiny-fnl", path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = from_pretrained("someone/tiny-fnl", cache_dir=str(cache))
    batch = inputs(model)
    assert torch.equal(outputs(loaded, batch), outputs(model, batch))
    with pytest.raises(FileNotFoundError, match="nor a model in the Hugging Face cache.*downloading is off"):
        from_pretrained("someone/absent", cache_dir=str(cache))


def test_hub_id_with_local_files_only(saved, tmp_path):
    path, model = saved
    cache = tmp_path / "hub"
    _fake_cache(cache, "someone/tiny-fnl", path)
    loaded = from_pretrained("someone/tiny-fnl", cache_dir=str(cache), local_files_only=True)
    assert torch.equal(outputs(loaded, inputs(model)), outputs(model, inputs(model)))


def test_not_a_directory_nor_an_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory with a saved model"):
        from_pretrained(str(tmp_path / "no" / "such" / "dir"))
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a directory with a saved model"):
        from_pretrained(str(f))
    assert not os.path.exists(tmp_path / "no")
