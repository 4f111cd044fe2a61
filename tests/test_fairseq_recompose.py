"""``fnl recompose``: fnl_transformer checkpoint -> stock fairseq ``transformer`` checkpoint.

* Math: zero-padding reduced heads and folding the score scaling into the query equals the reduced attention
  (against a direct per-head reference, for s_used != s_stock too).
* End to end, for a low-rank (SI + FD, untied factorized output projection), an overcomplete ``--deep`` (shared
  embeddings, tied factorized projection), a reduced-head model (QK and OV dims differ) and the paper's
  ``fnl_transformer_small`` layout compressed by the one rank scale with the official rules (no projection
  biases, factorized learned positions, heads scored by ``1/sqrt(reduced dim)``): stock
  ``fairseq-generate`` WITHOUT ``--user-dir`` on the recomposed file gives the same hypotheses as the fnl
  checkpoint with the plugin; the unrounded per-token scores of both (beam search in this process) agree within
  ``SCORE_TOL``; the file holds no pickled class.
* Bad input: one ``fnl recompose: error:`` line, exit code 2, and no output (or partial file) left behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

import pytest
import torch

from fairseq_helpers import make_tiny_data, run_fairseq_cli, run_fairseq_train, tiny_train_args, user_dir

pytest.importorskip("fairseq")

from fnl_transformers import cli  # noqa: E402
from fnl_transformers.fairseq_plugin import recompose  # noqa: E402

CONFIGS = {
    "low_rank": [
        "--rank-scale",
        "0.5",
        "--spectral-init",
        "--criterion",
        "fd_label_smoothed_cross_entropy",
        "--fd-linear",
        "1e-3",
        "--fd-qk",
        "1e-3",
        "--fd-ov",
        "1e-3",
    ],
    "deep": ["--rank-scale", "2", "--deep", "--spectral-init", "--share-all-embeddings"],
    "reduced_heads": [
        "--head-dim-qk",
        "3",
        "--head-dim-ov",
        "5",
        "--spectral-init-qk",
        "--spectral-init-ov",
        "--rank-scale",
        "0.5",
        "--factorize",
        "ffn",
    ],
    # the paper's model (fnl_transformer_small's layout at tiny widths) compressed by the one rank scale with the
    # official rules: no projection biases, pre-norm, learned positions (factorized), fresh heads scored by
    # 1/sqrt(reduced dim), each factor drawn from the dense init
    "paper_small": [
        "--arch",
        "fnl_transformer_small",
        "--encoder-embed-dim",
        "32",
        "--decoder-embed-dim",
        "32",
        "--encoder-ffn-embed-dim",
        "64",
        "--decoder-ffn-embed-dim",
        "64",
        "--rank-scale",
        "0.5",
        "--factorize",
        "ffn,embedding,position,attention",
        "--reduced-heads",
        "fresh",
        "--factor-init",
        "dense",
        "--no-spectral-init",
        "--spectral-init-qk",
        "--spectral-init-ov",
        "--criterion",
        "fd_label_smoothed_cross_entropy",
        "--fd-linear",
        "1e-3",
        "--fd-ov",
        "1e-3",
    ],
}
# Scores (log-probabilities of size ~1-5) of the fnl model and of its recomposed dense copy come from different
# float32 code paths (factors vs their product, reduced vs zero-padded heads) with BLAS rounding that depends on
# the thread count: measured differences <= 1.2e-6 with 1 and with 2 threads, so SCORE_TOL has a margin of 80x.
SCORE_TOL = 1e-4
# fairseq-generate prints positional scores rounded to 4 decimals: printed values of two floats that differ by d
# can differ by d + 1e-4 (one print unit; measured: exactly 1e-4 with 2 threads), so they get SCORE_TOL + 1e-4.
PRINT_UNIT = 1e-4


# ---------------------------------------------------------------- math


def _attention(x, mem, p, H, scaling):
    """Per-head attention by the definition (nn.Linear layout), head dims read from the weights."""
    dq, dv = p["q_weight"].shape[0] // H, p["v_weight"].shape[0] // H
    lin = lambda t, w, b: t @ w.T + (0 if b is None else b)  # noqa: E731
    q = lin(x, p["q_weight"], p["q_bias"]).view(x.shape[0], H, dq).transpose(0, 1) * scaling
    k = lin(mem, p["k_weight"], p["k_bias"]).view(mem.shape[0], H, dq).transpose(0, 1)
    v = lin(mem, p["v_weight"], p["v_bias"]).view(mem.shape[0], H, dv).transpose(0, 1)
    a = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v  # H x T x dv
    return lin(a.transpose(0, 1).reshape(x.shape[0], H * dv), p["o_weight"], p["o_bias"])


@pytest.mark.parametrize("scaling", [8**-0.5, 0.37])  # fnl's original scaling, and an arbitrary one
def test_padded_heads_with_folded_scaling_equal_reduced_attention(scaling):
    g = torch.Generator().manual_seed(0)
    H, d, dq, dv = 4, 32, 3, 5
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    p = {
        "q_weight": r(H * dq, d),
        "q_bias": r(H * dq),
        "k_weight": r(H * dq, d),
        "k_bias": r(H * dq),
        "v_weight": r(H * dv, d),
        "v_bias": r(H * dv),
        "o_weight": r(d, H * dv),
        "o_bias": r(d),
    }
    x, mem = r(6, d), r(9, d)
    dense = recompose.dense_attention(p, H, d, scaling)
    assert dense["q_weight"].shape == (d, d) and dense["o_weight"].shape == (d, d)
    expected = _attention(x, mem, p, H, scaling)
    got = _attention(x, mem, dense, H, (d // H) ** -0.5)  # the stock module's scaling
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_padding_refuses_wider_heads():
    p = {
        "q_weight": torch.zeros(4 * 9, 32),
        "q_bias": None,
        "k_weight": torch.zeros(4 * 9, 32),
        "k_bias": None,
        "v_weight": torch.zeros(4 * 8, 32),
        "v_bias": None,
        "o_weight": torch.zeros(32, 4 * 8),
        "o_bias": None,
    }
    with pytest.raises(ValueError, match=r"per-head QK dim 9 does not fit .*dimension 8 and can only shrink"):
        recompose.dense_attention(p, 4, 32, 8**-0.5)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def fnl_checkpoints(data_bin, tmp_path_factory):
    out = {}
    for name, extra in CONFIGS.items():
        save_dir = str(tmp_path_factory.mktemp(name))
        run_fairseq_train(tiny_train_args(data_bin, save_dir, *extra, updates=4))
        out[name] = os.path.join(save_dir, "checkpoint_last.pt")
    return out


def _generate_in_process(argv) -> str:
    """fairseq-generate in this process (the plugin is imported here anyway); returns its stdout."""
    from fairseq import options
    from fairseq_cli import generate

    args = options.parse_args_and_arch(options.get_generation_parser(), [str(a) for a in argv])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        generate.main(args)
    return buf.getvalue()


def _hypotheses(stdout: str):
    """{sentence id: (hypothesis tokens, score, positional scores)} from fairseq-generate output."""
    hyps, pos = {}, {}
    for line in stdout.splitlines():
        m = re.match(r"^H-(\d+)\t(\S+)\t(.*)$", line)
        if m:
            hyps[int(m.group(1))] = (m.group(3), float(m.group(2)))
        m = re.match(r"^P-(\d+)\t(.*)$", line)
        if m:
            pos[int(m.group(1))] = [float(v) for v in m.group(2).split()]
    return {i: (h, s, pos[i]) for i, (h, s) in hyps.items()}


def _beam_in_process(path, data_bin):
    """{sentence id: (tokens, score, positional scores)}, unrounded: beam 3 over the test set in this process."""
    from fairseq import checkpoint_utils
    from fairseq.sequence_generator import SequenceGenerator

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data_bin})
    task.load_dataset("test")
    ds = task.dataset("test")
    sample = ds.collater([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        hyps = SequenceGenerator(models, task.target_dictionary, beam_size=3).generate(models, sample)
    return {
        int(i): (h[0]["tokens"].tolist(), float(h[0]["score"]), h[0]["positional_scores"])
        for i, h in zip(sample["id"], hyps)
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_recomposed_checkpoint_translates_identically_without_user_dir(
    name, fnl_checkpoints, data_bin, tmp_path, capsys
):
    src = fnl_checkpoints[name]
    dst = str(tmp_path / "stock.pt")
    assert cli.main(["recompose", src, dst]) == 0
    assert "wrote" in capsys.readouterr().out
    assert torch.serialization.get_unsafe_globals_in_checkpoint(dst) == []
    assert os.listdir(tmp_path) == ["stock.pt"]  # no temporary file left

    gen = [data_bin, "--beam", "3", "--cpu", "--gen-subset", "test", "--batch-size", "8"]
    ref = _hypotheses(_generate_in_process(gen + ["--path", src, "--user-dir", user_dir()]))
    got = _hypotheses(run_fairseq_cli("generate", gen + ["--path", dst]).stdout)  # a fresh process, no plugin
    assert len(ref) == 8 and got.keys() == ref.keys()
    for i in ref:
        assert got[i][0] == ref[i][0], f"sentence {i}: {got[i][0]!r} vs {ref[i][0]!r}"
        assert abs(got[i][1] - ref[i][1]) <= SCORE_TOL  # H- lines print the score unrounded
        assert max(abs(a - b) for a, b in zip(got[i][2], ref[i][2])) <= SCORE_TOL + PRINT_UNIT  # P-: 4 decimals
    # the unrounded per-token scores, fnl model (plugin) vs the recomposed stock model
    ref, got = _beam_in_process(src, data_bin), _beam_in_process(dst, data_bin)
    assert len(ref) == 8 and got.keys() == ref.keys()
    for i in ref:
        assert got[i][0] == ref[i][0], f"sentence {i}: {got[i][0]} vs {ref[i][0]}"
        assert abs(got[i][1] - ref[i][1]) <= SCORE_TOL
        torch.testing.assert_close(got[i][2], ref[i][2], rtol=0, atol=SCORE_TOL)

    state = torch.load(dst, weights_only=True)  # plain torch, default allow-list
    assert state["cfg"]["model"]["arch"] == "transformer"
    sd = state["model"]
    d, heads = 32, 4  # fnl_transformer_tiny
    assert sd["encoder.layers.0.self_attn.q_proj.weight"].shape == (d, d)
    assert sd["decoder.layers.1.encoder_attn.out_proj.weight"].shape == (d, d)
    assert sd["encoder.layers.0.fc1.weight"].shape == (64, d)
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    if name == "reduced_heads":  # zero-padded: head h's rows dq..D of q_proj are zero
        q = sd["encoder.layers.0.self_attn.q_proj.weight"].view(heads, d // heads, d)
        assert q[:, 3:].abs().max() == 0 and q[:, :3].abs().max() > 0
    if name == "paper_small":  # stock pre-norm transformer with learned positions; the absent biases are zeros
        model = state["cfg"]["model"]
        assert model["encoder_normalize_before"] and model["decoder_learned_pos"] and model["no_scale_embedding"]
        assert "projection_bias" not in model and "reduced_heads" not in model
        assert sd["encoder.embed_positions.weight"].shape == (1024, d)  # 1022 positions + padding offset
        for key in (
            "encoder.layers.0.self_attn.q_proj.bias",
            "decoder.layers.1.encoder_attn.out_proj.bias",
            "decoder.layers.0.fc1.bias",
            "encoder.layers.1.fc2.bias",
        ):
            assert sd[key].abs().max() == 0, key


# ---------------------------------------------------------------- bad input


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fnl recompose: error: ")
    return err[0]


def test_missing_checkpoint(tmp_path, capsys):
    assert cli.main(["recompose", str(tmp_path / "nope.pt"), str(tmp_path / "out.pt")]) == 2
    assert "does not exist" in _error_line(capsys)
    assert os.listdir(tmp_path) == []


def test_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\n")
    assert cli.main(["recompose", str(bad), str(tmp_path / "out.pt")]) == 2
    assert _error_line(capsys) == (
        f"fnl recompose: error: {bad} is a text file, not a PyTorch checkpoint; give a "
        "checkpoint_*.pt written by fairseq-train (e.g. checkpoints/checkpoint_best.pt)"
    )
    torch.save({"weights": torch.zeros(2)}, str(tmp_path / "plain.pt"))
    assert cli.main(["recompose", str(tmp_path / "plain.pt"), str(tmp_path / "out.pt")]) == 2
    assert "a PyTorch file but not a fairseq checkpoint: it holds a dict with keys 'weights'" in _error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "plain.pt"]


def test_malicious_checkpoint_is_refused(tmp_path, capsys):
    from test_fairseq_safety import _malicious_checkpoint

    marker = tmp_path / "pwned"
    bad = _malicious_checkpoint(tmp_path / "checkpoint_bad.pt", str(marker))
    assert cli.main(["recompose", bad, str(tmp_path / "out.pt")]) == 2
    assert "refusing to load" in _error_line(capsys)
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


@pytest.mark.slow
def test_stock_checkpoint_existing_output_and_atomic_write(fnl_checkpoints, tmp_path, capsys, monkeypatch):
    src = fnl_checkpoints["low_rank"]
    out = tmp_path / "out.pt"
    out.write_bytes(b"partial")  # e.g. left by something else: never silently replaced
    assert cli.main(["recompose", src, str(out)]) == 2
    assert "already exists" in _error_line(capsys) and out.read_bytes() == b"partial"

    # a failure while writing leaves neither the output nor a temporary file
    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(recompose.torch, "save", broken_save)
    with pytest.raises(OSError):
        recompose.write_atomically({"x": 1}, str(tmp_path / "new.pt"))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["out.pt"]

    assert cli.main(["recompose", src, str(out), "--force"]) == 0
    capsys.readouterr()
    stock = str(out)
    assert cli.main(["recompose", stock, str(tmp_path / "again.pt")]) == 2  # a stock checkpoint
    assert "'transformer' checkpoint" in _error_line(capsys)
    assert cli.main(["recompose", src, str(tmp_path / "no_such_dir" / "x.pt")]) == 2
    assert "does not exist" in _error_line(capsys)


@pytest.mark.slow
def test_checkpoint_whose_config_does_not_match_its_weights(fnl_checkpoints, tmp_path, capsys):
    from fnl_transformers.fairseq_plugin import safe_loading

    state = safe_loading.safe_load(fnl_checkpoints["low_rank"], map_location="cpu")
    state["cfg"]["model"].rank_scale = 0.25  # weights are rank-scale 0.5
    bad = str(tmp_path / "mismatch.pt")
    torch.save(state, bad)
    assert cli.main(["recompose", bad, str(tmp_path / "out.pt")]) == 2
    line = _error_line(capsys)
    assert "does not match this fnl_transformer configuration" in line and "--rank-scale" in line
    assert not (tmp_path / "out.pt").exists()
