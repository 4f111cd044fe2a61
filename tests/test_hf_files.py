"""`fnl compress` carries every non-weight file of the source directory (tokenizer, sentence-transformers modules),
never the source weights; a compressed, recomposed sentence-transformers model loads as one again."""

import os
import shutil

import pytest
import torch
from hf_text_helpers import HELD_OUT

from fnl_transformers.cli import main
from fnl_transformers.hf.files import copy_non_weight_files, is_weight_file

from hf_patch_helpers import minilm_dir, tiny


def test_copy_non_weight_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = {
        "config.json": "{}",
        "generation_config.json": "{}",
        "model.safetensors": "w",
        "model-00001-of-00002.safetensors": "w",
        "model.safetensors.index.json": "{}",
        "pytorch_model.bin": "w",
        "tf_model.h5": "w",
        "onnx/model.onnx": "w",
        "openvino/openvino_model.xml": "<net/>",
        "openvino/openvino_model.bin": "w",
        "rust_model.ot": "w",
        ".gitattributes": "x",
        ".cache/huggingface/x": "x",
        "tokenizer.json": "{}",
        "vocab.txt": "a",
        "modules.json": "[]",
        "1_Pooling/config.json": "{}",
        "config_sentence_transformers.json": "{}",
        "README.md": "# card",
        "docs/notes.xml": "<keep/>",
    }
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    dst.mkdir()
    (dst / "vocab.txt").write_text("already here")
    copied, skipped = copy_non_weight_files(str(src), str(dst))
    assert sorted(copied) == [
        "1_Pooling/config.json",
        "README.md",
        "config_sentence_transformers.json",
        "docs/notes.xml",
        "modules.json",
        "tokenizer.json",
    ]
    assert sorted(skipped) == [
        "model-00001-of-00002.safetensors",
        "model.safetensors",
        "model.safetensors.index.json",
        "onnx/model.onnx",
        "openvino/openvino_model.bin",
        "openvino/openvino_model.xml",
        "pytorch_model.bin",
        "rust_model.ot",
        "tf_model.h5",
    ]
    assert (dst / "vocab.txt").read_text() == "already here"  # existing files are kept
    assert not (dst / "onnx").exists() and not (dst / ".cache").exists()
    assert is_weight_file("x/fnl_model.safetensors") and not is_weight_file("x/tokenizer.json")


def test_compress_keeps_tokenizer_and_sentence_transformers_files(tmp_path, capsys):
    src = tmp_path / "src"
    tiny("bert").save_pretrained(src)
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "vocab.txt"):
        shutil.copy2(os.path.join(minilm_dir(), name), src / name)
    shutil.copytree(os.path.join(minilm_dir(), "1_Pooling"), src / "1_Pooling")
    assert main(["compress", str(src), str(tmp_path / "out"), "--rank-scale", "0.5"]) == 0
    assert "(not copied, weights of the original: model.safetensors)" in capsys.readouterr().out
    for name in (
        "modules.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
        "vocab.txt",
        os.path.join("1_Pooling", "config.json"),
    ):
        assert (tmp_path / "out" / name).read_bytes() == open(os.path.join(minilm_dir(), name), "rb").read(), name
    assert sorted(n for n in os.listdir(tmp_path / "out") if "safetensors" in n) == [
        "fnl_model.safetensors",
        "model.safetensors.index.json",
    ]  # marked: plain transformers refuses it


@pytest.mark.slow
def test_sentence_transformers_round_trip_compress_recompose(tmp_path, capsys):
    """compress MiniLM -> (sentence-transformers refuses the factorized dir with the pointer) -> recompose, save,
    carry the files -> SentenceTransformer loads it and encodes as the compressed model does (1e-5)."""
    st = pytest.importorskip("sentence_transformers")
    from fnl_transformers.hf import from_pretrained, recompose

    out, plain = tmp_path / "compressed", tmp_path / "recomposed"
    assert main(["compress", minilm_dir(), str(out), "--rank-scale", "0.5", "--head-dim", "16"]) == 0
    capsys.readouterr()
    with pytest.raises((ValueError, OSError), match=r"fnl_transformers\.hf\.from_pretrained\(path\)"):
        st.SentenceTransformer(str(out), device="cpu")
    compressed = from_pretrained(out)
    recompose(compressed).save_pretrained(plain)
    copy_non_weight_files(str(out), str(plain))
    model = st.SentenceTransformer(str(plain), device="cpu")
    got = model.encode(HELD_OUT[:4], convert_to_tensor=True)

    from transformers import AutoTokenizer

    from fnl_transformers.hf.fidelity import mean_pooled

    tok = AutoTokenizer.from_pretrained(out)
    want = torch.nn.functional.normalize(mean_pooled(compressed, tok, HELD_OUT[:4]), dim=1)  # modules.json: Normalize
    assert float((got.cpu() - want).abs().max()) < 1e-5
    original = st.SentenceTransformer(minilm_dir(), device="cpu").encode(HELD_OUT[:4], convert_to_tensor=True)
    assert float((got.cpu() - original.cpu()).abs().max()) > 1e-3  # it is the compressed model, not the original
