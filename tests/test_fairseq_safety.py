"""Safe loading of fairseq checkpoints (fnl_transformers.fairseq_plugin.safe_loading).

* The allow-list is exact: the globals that real checkpoints need (measured here by loading each checkpoint
  with weights_only=True and an allow-list grown one refused global at a time) are exactly the allow-list.
* Real checkpoints load through fairseq's own loaders (load_checkpoint_to_cpu, hub from_pretrained,
  fairseq-generate), which fail without the plugin under torch >= 2.6.
* A malicious checkpoint (a pickle whose __reduce__ runs a shell command) is refused with a clear error and
  the command does not run, also under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 and through fairseq-generate and
  fairseq-train --restore-file.
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import io
import os
import pickle
import re
import shlex

import pytest
import torch

from fairseq_helpers import make_tiny_data, run_fairseq_cli, run_fairseq_train, tiny_train_args, user_dir

pytest.importorskip("fairseq")

from fnl_transformers.fairseq_plugin import safe_loading  # noqa: E402

# dims of a tiny stock `transformer` (fairseq's own architecture, no plugin)
STOCK = [
    "--encoder-layers",
    "1",
    "--decoder-layers",
    "1",
    "--encoder-embed-dim",
    "16",
    "--decoder-embed-dim",
    "16",
    "--encoder-ffn-embed-dim",
    "32",
    "--decoder-ffn-embed-dim",
    "32",
    "--encoder-attention-heads",
    "2",
    "--decoder-attention-heads",
    "2",
]

# optimizer / lr-scheduler / precision / logging options whose state ends up in the checkpoint
STOCK_VARIANTS = {
    "adam_inverse_sqrt_eval_bleu": [
        "--optimizer",
        "adam",
        "--lr-scheduler",
        "inverse_sqrt",
        "--warmup-updates",
        "2",
        "--eval-bleu",
        "--eval-bleu-detok",
        "space",
        "--best-checkpoint-metric",
        "bleu",
        "--maximize-best-checkpoint-metric",
    ],
    "nag_fixed": ["--optimizer", "nag", "--lr", "0.1", "--momentum", "0.9", "--lr-scheduler", "fixed"],
    "sgd_polynomial_decay_wd": [
        "--optimizer",
        "sgd",
        "--lr",
        "0.1",
        "--lr-scheduler",
        "polynomial_decay",
        "--total-num-update",
        "4",
        "--weight-decay",
        "0.01",
    ],
    "adafactor_cosine": [
        "--optimizer",
        "adafactor",
        "--lr",
        "0.01",
        "--lr-scheduler",
        "cosine",
        "--warmup-updates",
        "1",
    ],
    "adam_plateau_memfp16_ema": [
        "--optimizer",
        "adam",
        "--lr-scheduler",
        "reduce_lr_on_plateau",
        "--memory-efficient-fp16",
        "--store-ema",
        "--ema-start-update",
        "1",
    ],
}


# the plugin's model, optimizers and criterion (their state is in the checkpoint too)
FNL_VARIANTS = {
    "fnl_flambe_inverse_sqrt": [
        "--rank-scale",
        "0.5",
        "--optimizer",
        "flambe",
        "--fd-qk",
        "1e-3",
        "--fd-linear",
        "1e-3",
        "--fd-mode",
        "decoupled",
        "--weight-decay",
        "0.01",
        "--lr-scheduler",
        "inverse_sqrt",
        "--warmup-updates",
        "2",
    ],
    "fnl_lamb_deep_heads_fd": [
        "--rank-scale",
        "0.5",
        "--deep",
        "--head-dim",
        "4",
        "--optimizer",
        "fnl_lamb",
        "--criterion",
        "fd_label_smoothed_cross_entropy",
        "--fd-qk",
        "1e-3",
    ],
    "fnl_adam_shared_fd_diagnostics": [
        "--rank-scale",
        "0.5",
        "--share-all-embeddings",
        "--optimizer",
        "fnl_adam",
        "--weight-decay",
        "0.01",
        "--criterion",
        "fd_label_smoothed_cross_entropy",
        "--fd-linear",
        "1e-3",
        "--form-diagnostics-interval",
        "1",
    ],
}


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def stock_checkpoints(data_bin, tmp_path_factory):
    """name -> checkpoint_last.pt of a 3-update stock `transformer` run (no plugin)."""
    out = {}
    for name, extra in STOCK_VARIANTS.items():
        save_dir = str(tmp_path_factory.mktemp(name))
        run_fairseq_train(
            tiny_train_args(data_bin, save_dir, *STOCK, *extra, arch="transformer", updates=3, user_dir_flag=False)
        )
        out[name] = os.path.join(save_dir, "checkpoint_last.pt")
    return out


@pytest.fixture(scope="module")
def fnl_checkpoints(data_bin, tmp_path_factory):
    """name -> checkpoint_last.pt of a 3-update fnl_transformer_tiny run (with the plugin)."""
    out = {}
    for name, extra in FNL_VARIANTS.items():
        save_dir = str(tmp_path_factory.mktemp(name))
        run_fairseq_train(tiny_train_args(data_bin, save_dir, *extra, updates=3))
        out[name] = os.path.join(save_dir, "checkpoint_last.pt")
    return out


@pytest.fixture(scope="module")
def installed():
    safe_loading.install()
    return safe_loading


def _needed_globals(path: str) -> set:
    """The globals a checkpoint needs under weights_only=True: start from an empty user allow-list and add the
    global each refusal names (GLOBAL opcodes and the classes of BUILD targets). Only for our own files: this
    loop would allow whatever an untrusted file asks for."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    needed = []
    try:
        for _ in range(50):
            try:
                with torch.serialization.safe_globals(needed):
                    torch.load(path, weights_only=True)
                return {g[0] if isinstance(g, tuple) else g for g in needed}
            except pickle.UnpicklingError as exc:
                m = re.search(r"GLOBAL ([\w.]+) was not|but got <class '([\w.]+)'>", str(exc))
                assert m, str(exc)
                module, _, attr = (m.group(1) or m.group(2)).rpartition(".")
                needed.append(getattr(importlib.import_module(module) if module else builtins, attr))
        raise AssertionError("too many globals")
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def _allow_list_objects() -> set:
    return {g[0] if isinstance(g, tuple) else g for g in safe_loading.fairseq_checkpoint_globals()}


def test_allow_list_is_exactly_what_fairseq_checkpoints_need(stock_checkpoints, fnl_checkpoints):
    needed = {name: _needed_globals(path) for name, path in {**stock_checkpoints, **fnl_checkpoints}.items()}
    for name, globs in needed.items():
        assert argparse.Namespace in globs, name  # cfg["model"] of a legacy (add_args) model
    union = set().union(*needed.values())
    assert union == _allow_list_objects(), (
        f"extra in allow-list: {_allow_list_objects() - union}; missing: {union - _allow_list_objects()}"
    )
    # only --eval-bleu stores numpy arrays (BLEU n-gram counts in the meters)
    assert needed["nag_fixed"] == {argparse.Namespace}
    for name in FNL_VARIANTS:  # the plugin adds nothing: its optimizer groups hold only numbers and lists
        assert needed[name] == {argparse.Namespace}, name
    assert len(needed["adam_inverse_sqrt_eval_bleu"]) > 1


def test_install_is_idempotent(installed):
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    installed.install()
    installed.install()
    assert isinstance(checkpoint_utils.torch, safe_loading._SafeTorch)
    assert isinstance(distributed_utils.torch, safe_loading._SafeTorch)
    assert checkpoint_utils.torch.device is torch.device  # everything else is torch's
    keys = [repr(g) for g in torch.serialization.get_safe_globals()]
    assert len(keys) == len(set(keys)), "install() added an allow-list entry twice"


def test_real_checkpoints_load_through_fairseq_loaders(installed, stock_checkpoints, fnl_checkpoints, monkeypatch):
    from fairseq import checkpoint_utils

    # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only changes torch's default; fairseq's calls are forced to True
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for name, path in stock_checkpoints.items():
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
        assert state["cfg"].model.arch == "transformer", name
        assert state["model"]["encoder.layers.0.fc1.weight"].shape == (32, 16), name
    for name, path in fnl_checkpoints.items():
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
        assert state["cfg"].model.arch == "fnl_transformer_tiny", name
        assert "encoder.layers.0.fc1.U" in state["model"], name
    ema = checkpoint_utils.load_ema_from_checkpoint(stock_checkpoints["adam_plateau_memfp16_ema"])
    assert "encoder.layers.0.fc1.weight" in ema["model"]


def test_hub_from_pretrained_translates(installed, stock_checkpoints, data_bin):
    from fairseq.models.transformer import TransformerModel

    path = stock_checkpoints["nag_fixed"]
    hub = TransformerModel.from_pretrained(
        os.path.dirname(path), checkpoint_file=os.path.basename(path), data_name_or_path=data_bin
    )
    out = hub.translate("s1 s2 s3", beam=2)
    assert isinstance(out, str)


class _RunsCommand:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def _malicious_checkpoint(path, marker) -> str:
    torch.save(
        {"args": None, "cfg": None, "model": {"w": torch.zeros(2)}, "extra_state": _RunsCommand(marker)}, str(path)
    )
    return str(path)


def test_malicious_payload_really_runs_when_unpickled_unsafely(tmp_path):
    # the test below can fail: the same object, unpickled by plain pickle, runs the command
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_RunsCommand(str(marker))))
    assert marker.exists()


def test_malicious_checkpoint_refused_in_process(installed, tmp_path, monkeypatch):
    from fairseq import checkpoint_utils

    marker = tmp_path / "pwned"
    bad = _malicious_checkpoint(tmp_path / "checkpoint_bad.pt", str(marker))
    for force_no_weights_only in ("0", "1"):
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", force_no_weights_only)
        with pytest.raises(safe_loading.UnsafeCheckpointError, match=r"refusing to load .*checkpoint_bad\.pt.*system"):
            checkpoint_utils.load_checkpoint_to_cpu(bad)
        assert not marker.exists()
    # the error is still an UnpicklingError for callers that catch that
    with pytest.raises(pickle.UnpicklingError):
        safe_loading.safe_load(io.BytesIO(open(bad, "rb").read()))
    assert not marker.exists()


@pytest.mark.slow
def test_stock_generate_fails_without_plugin_and_works_with_it(stock_checkpoints, data_bin):
    path = stock_checkpoints["nag_fixed"]
    argv = [data_bin, "--path", path, "--beam", "2", "--cpu", "--gen-subset", "test", "--batch-size", "8"]
    bare = run_fairseq_cli("generate", argv, check=False)
    assert bare.returncode != 0 and "argparse.Namespace" in bare.stdout + bare.stderr  # the bug being fixed
    res = run_fairseq_cli("generate", argv + ["--user-dir", user_dir()])
    assert len(re.findall(r"^H-\d+\t", res.stdout, re.M)) == 8


@pytest.mark.slow
def test_malicious_checkpoint_refused_by_fairseq_commands(tmp_path, data_bin):
    marker = tmp_path / "pwned"
    bad = _malicious_checkpoint(tmp_path / "checkpoint_bad.pt", str(marker))
    gen = run_fairseq_cli(
        "generate", [data_bin, "--path", bad, "--cpu", "--gen-subset", "test", "--user-dir", user_dir()], check=False
    )
    assert gen.returncode != 0
    assert "UnsafeCheckpointError: refusing to load" in gen.stderr + gen.stdout
    assert not marker.exists()
    save_dir = str(tmp_path / "resume")
    with pytest.raises(RuntimeError, match="refusing to load"):
        run_fairseq_train(
            tiny_train_args(data_bin, save_dir, *STOCK, "--restore-file", bad, arch="transformer", updates=1),
            in_process=False,
        )
    assert not marker.exists()
