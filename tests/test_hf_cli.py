"""`fnl compress` and `fnl inspect`: the per-layer table, a reloadable output, one-line errors."""

import os

import pytest
import torch

from fnl_transformers.cli import main
from fnl_transformers.hf import from_pretrained

from hf_patch_helpers import inputs, minilm_dir, outputs, tiny


@pytest.mark.slow
def test_compress_minilm_half_head_dim_and_rank_scale(tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "mini"
    assert main(["compress", minilm_dir(), str(out), "--head-dim", "16", "--rank-scale", "0.5"]) == 0
    table = capsys.readouterr().out
    assert "encoder.layer.5.attention           qk         12 heads x 32  16" in table
    assert "encoder.layer.0.intermediate.dense  linear     1536 x 384     192" in table
    assert "embeddings.word_embeddings          embedding  30522 x 384    192" in table
    assert "total parameters: 22,713,216 -> 12,499,584" in table

    model = from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)  # the tokenizer files were copied
    batch = tok(["a compressed sentence encoder", "still runs"], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, batch["input_ids"].shape[1], 384) and torch.isfinite(hidden).all()
    assert model.encoder.layer[0].attention.self.query.out_features == 12 * 16

    assert main(["inspect", str(out)]) == 0
    again = capsys.readouterr().out
    assert "output fidelity not measured: give --eval-text FILE" in table  # no texts given: said, not skipped
    assert table.split("output fidelity not measured")[0].strip() in again  # inspect shows the same table


def test_compress_and_inspect_a_small_model(tmp_path, capsys):
    tiny("gpt2").save_pretrained(tmp_path / "src")
    assert (
        main(
            [
                "compress",
                str(tmp_path / "src"),
                str(tmp_path / "out"),
                "--target-param-ratio",
                "0.8",
                "--head-dim-qk",
                "4",
                "--factorize",
                "ffn",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "transformer.h.1.mlp.c_proj" in table and "transformer.wte" not in table
    model = from_pretrained(tmp_path / "out")
    assert outputs(model, inputs(model)).shape[-1] == model.config.vocab_size
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert "transformer.h.0.attn" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".fnl-compress-")]  # no temporary left over


@pytest.mark.parametrize(
    "args,message",
    [
        (["--rank-scale", "1.5"], "--rank-scale must be in (0, 1] to compress"),
        ([], "nothing to compress"),
        (["--head-dim", "64"], "does not fit"),
        (["--rank-scale", "0.5", "--factorize", "ffn,heads"], "unknown part(s) ['heads']"),
    ],
)
def test_compress_bad_input_is_one_error_line(tmp_path, capsys, args, message):
    tiny("bert").save_pretrained(tmp_path / "src")
    capsys.readouterr()
    assert main(["compress", str(tmp_path / "src"), str(tmp_path / "out")] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fnl compress: error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_compress_refuses_existing_output_and_missing_input(tmp_path, capsys):
    tiny("bert").save_pretrained(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert main(["compress", str(tmp_path / "src"), str(tmp_path / "out"), "--rank-scale", "0.5"]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "none"), str(tmp_path / "o2"), "--rank-scale", "0.5"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_inspect_refuses_a_vanilla_model(tmp_path, capsys):
    tiny("bert").save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a fnl_transformers checkpoint" in capsys.readouterr().err


def test_compress_unsupported_architecture_is_one_error_line(tmp_path, capsys):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(
        OPTConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    ).save_pretrained(tmp_path / "src")
    capsys.readouterr()
    assert main(["compress", str(tmp_path / "src"), str(tmp_path / "out"), "--rank-scale", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not support model_type 'opt'" in err[0] and "supported model types: bert" in err[0]
    assert not (tmp_path / "out").exists()
