"""fnl_transformer end to end with fairseq's own commands on a tiny generated corpus: train, validate, checkpoint,
resume, generate, interactive and hub loading for each variant; identity with ``transformer`` when every option
is off; ``--update-freq 2`` equals one batch twice the size; the real console commands from another directory.

Tolerances: the update-freq comparison uses SGD (parameters are then a linear function of the gradients) and
atol 1e-5 after 3 updates; hypotheses must be identical across generate / interactive / hub, scores within 1e-4.
"""

import os
import shlex
import subprocess
import sys

import pytest
import torch

import fairseq_helpers as fh

pytest.importorskip("fairseq")
pytestmark = pytest.mark.slow  # end to end (fairseq-train runs; one test runs the console commands)

from fnl_transformers.fairseq_plugin import FnlTransformerModel  # noqa: E402

FD = ["--criterion", "fd_label_smoothed_cross_entropy"]
VARIANTS = {
    "dense_fd_qk_ov": FD + ["--fd-qk", "0.01", "--fd-ov", "0.01"],
    "lowrank_si_fd": FD
    + [
        "--rank-scale",
        "0.5",
        "--spectral-init",
        "--fd-linear",
        "0.01",
        "--fd-qk",
        "0.01",
        "--optimizer",
        "fnl_adam",
        "--weight-decay",
        "0.01",
        "--form-diagnostics-interval",
        "2",
    ],
    "reduced_heads": ["--head-dim-qk", "4", "--head-dim-ov", "2", "--spectral-init-qk", "--spectral-init-ov"],
    "shared_embeddings": ["--share-all-embeddings", "--rank-scale", "0.5", "--spectral-init", "--deep"],
    "update_freq_2": FD
    + ["--update-freq", "2", "--rank-scale", "0.5", "--share-decoder-input-output-embed", "--fd-ov", "0.01"],
}
LANGS = ["--source-lang", "src", "--target-lang", "tgt"]


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    return fh.make_tiny_data(tmp_path_factory.mktemp("fairseq_data"))


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_resumes_and_translates(data_bin, tmp_path, variant):
    save = str(tmp_path / "ckpt")
    extra = list(VARIANTS[variant])
    if variant == "lowrank_si_fd":
        extra += ["--tensorboard-logdir", str(tmp_path / "tb")]
    first = fh.run_fairseq_train(fh.tiny_train_args(data_bin, save, *extra, updates=4))
    assert [int(s["num_updates"]) for s in first.train] == [1, 2, 3, 4]
    assert first.valid and float(first.valid[-1]["valid_loss"]) < float(first.train[0]["loss"])
    assert os.path.exists(os.path.join(save, "checkpoint_last.pt"))
    assert _state(os.path.join(save, "checkpoint_last.pt"))["cfg"]["model"].arch == "fnl_transformer_tiny"

    # resume: continues from update 4 with the saved optimizer state
    resumed = fh.run_fairseq_train(fh.tiny_train_args(data_bin, save, *extra, updates=6))
    assert [int(s["num_updates"]) for s in resumed.train] == [5, 6]
    assert "Loaded checkpoint" in resumed.output

    if "--fd-qk" in extra or "--fd-ov" in extra:
        kinds = {k for k in first.train[-1] if k.startswith("fd_")}
        assert kinds == {
            f"fd_{k}"
            for k in ("qk", "ov", "linear", "embedding")
            if f"--fd-{k}" in extra or (k == "embedding" and "--fd-linear" in extra)
        }
        assert all(float(first.train[-1][k]) > 0 for k in kinds)
        assert not any(k.startswith("valid_fd") for k in first.valid[-1])  # no FD in validation
    if variant == "lowrank_si_fd":
        diag = [s for s in first.train if s.get("form/qk/frobenius") is not None]
        assert [int(s["num_updates"]) for s in diag] == [1, 3]  # updates 0 and 2 (every 2)
        for kind in ("qk", "ov", "linear", "embedding"):
            rec = diag[0]
            # equal in exact arithmetic for SI factors (balanced), logged with 6 significant digits: 1e-3 slack
            assert float(rec[f"form/{kind}/nuclear"]) <= float(rec[f"form/{kind}/wd_bound"]) * (1 + 1e-3)
            assert float(rec[f"form/{kind}/eff_step"]) > 0
        events = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "tb") for f in fs if "tfevents" in f]
        assert any(b"form/qk/frobenius" in open(f, "rb").read() for f in events)

    # translate the test set three ways: identical hypotheses
    ckpt = os.path.join(save, "checkpoint_last.pt")
    gen_args = [data_bin, "--path", ckpt, "--user-dir", fh.user_dir(), *LANGS, "--beam", "3", "--batch-size", "8"]
    generated = fh.hypotheses(fh.run_fairseq_cli("generate", gen_args, in_process=True).stdout)
    assert len(generated) == 8
    sources = list(generated)
    inter = fh.run_fairseq_cli(
        "interactive", gen_args + ["--buffer-size", "8"], stdin="\n".join(sources) + "\n", in_process=True
    )
    interactive = fh.hypotheses(inter.stdout)
    assert set(interactive) == set(sources)
    for s in sources:
        assert interactive[s][0] == generated[s][0]
        assert abs(interactive[s][1] - generated[s][1]) <= 1e-4
    hub = FnlTransformerModel.from_pretrained(
        save, checkpoint_file="checkpoint_last.pt", data_name_or_path=data_bin, source_lang="src", target_lang="tgt"
    )
    assert hub.translate(sources, beam=3) == [generated[s][0] for s in sources]


def test_all_options_off_trains_exactly_like_transformer(data_bin, tmp_path):
    common = ["--dropout", "0.1", "--attention-dropout", "0.1", "--disable-validation"]
    dims = [
        "--encoder-embed-dim",
        "32",
        "--encoder-ffn-embed-dim",
        "64",
        "--encoder-layers",
        "2",
        "--encoder-attention-heads",
        "4",
        "--decoder-layers",
        "2",
        "--decoder-attention-heads",
        "4",
        "--decoder-embed-dim",
        "32",
        "--decoder-ffn-embed-dim",
        "64",
    ]
    ref = fh.run_fairseq_train(
        fh.tiny_train_args(
            data_bin, str(tmp_path / "ref"), *common, *dims, arch="transformer", updates=20, user_dir_flag=False
        )
    )
    ours = fh.run_fairseq_train(fh.tiny_train_args(data_bin, str(tmp_path / "ours"), *common, updates=20))
    assert len(ref.train) == len(ours.train) == 20
    assert [s["loss"] for s in ours.train] == [s["loss"] for s in ref.train]
    a = _state(str(tmp_path / "ref" / "checkpoint_last.pt"))["model"]
    b = _state(str(tmp_path / "ours" / "checkpoint_last.pt"))["model"]
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # bitwise the same run


def test_update_freq_2_equals_one_batch_twice_the_size(tmp_path):
    data = fh.make_tiny_data(tmp_path / "d8", n_train=8)  # 8 sentences: one batch of 8 == two batches of 4
    flags = FD + [
        "--rank-scale",
        "0.5",
        "--spectral-init",
        "--fd-linear",
        "0.05",
        "--fd-qk",
        "0.05",
        "--fd-ov",
        "0.05",
        "--optimizer",
        "sgd",
        "--lr",
        "0.5",
        "--disable-validation",
    ]
    one = fh.run_fairseq_train(fh.tiny_train_args(data, str(tmp_path / "one"), *flags, "--batch-size", "8", updates=3))
    two = fh.run_fairseq_train(
        fh.tiny_train_args(data, str(tmp_path / "two"), *flags, "--batch-size", "4", "--update-freq", "2", updates=3)
    )
    assert [s["bsz"] for s in one.train] == [s["bsz"] for s in two.train] == ["8"] * 3
    for k in ("fd_linear", "fd_qk", "fd_ov", "fd_embedding"):
        # logged once per update, same value: printed with 6 significant digits (one unit <= 1e-5 relative) from
        # float32 sums in another order, so within one print unit plus 1e-5 (FD logged twice would be 2x)
        one_k, two_k = [float(s[k]) for s in one.train], [float(s[k]) for s in two.train]
        assert two_k == pytest.approx(one_k, rel=2e-5)
    a = _state(str(tmp_path / "one" / "checkpoint_last.pt"))["model"]
    b = _state(str(tmp_path / "two" / "checkpoint_last.pt"))["model"]
    start = fh.build_model(fh.tiny_train_args(data, "unused", *flags))[0].state_dict()
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-2  # the updates did something
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)


def test_console_commands_with_user_dir_from_another_directory(data_bin, tmp_path):
    """The documented usage, verbatim: `fairseq-train ... --user-dir "$(fnl userdir)"` run by bash in another
    working directory, then the stock fairseq-generate; and a script that imports fnl_transformers before fairseq
    then runs fairseq-interactive with the user dir."""
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    work = tmp_path / "elsewhere"
    work.mkdir()
    argv = fh.tiny_train_args(data_bin, "ckpt", *VARIANTS["lowrank_si_fd"][:-2], updates=2, user_dir_flag=False)
    cmd = "fairseq-train " + " ".join(shlex.quote(a) for a in argv) + ' --user-dir "$(fnl userdir)"'
    res = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    ckpt = str(work / "ckpt" / "checkpoint_last.pt")
    assert os.path.exists(ckpt)

    gen = [data_bin, "--path", ckpt, "--user-dir", fh.user_dir(), *LANGS, "--beam", "2", "--batch-size", "8"]
    res = subprocess.run(
        [os.path.join(bindir, "fairseq-generate"), *gen], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-4000:]
    generated = fh.hypotheses(res.stdout)
    assert len(generated) == 8

    script = (
        "import fnl_transformers, sys\n"  # fnl_transformers first: must not break the later --user-dir
        "assert 'fairseq' not in sys.modules\n"
        "from fairseq_cli.interactive import cli_main\n"
        f"sys.argv = ['fairseq-interactive'] + {gen + ['--buffer-size', '8']!r}\n"
        "cli_main()\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        cwd=work,
        env=env,
        input="\n".join(generated) + "\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert {s: h for s, (h, _) in fh.hypotheses(res.stdout).items()} == {s: h for s, (h, _) in generated.items()}
