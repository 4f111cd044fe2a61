"""fairseq mixed precision with Frobenius decay, on the CPU: ``--fp16``, ``--bf16``, ``--memory-efficient-fp16``,
``--memory-efficient-bf16`` and ``--amp``, each with coupled FD (``fnl_adam`` and ``fnl_lamb`` with
``--weight-decay``) and decoupled FD (``flambe`` with ``--weight-decay``).

Every cell runs on a CPU. ``--fp16`` and the memory-efficient modes run as fairseq runs them on a GPU (half-precision
model, dynamic loss scaler). ``--bf16`` runs because the plugin clears the TPU flag fairseq's command line adds to it
where torch_xla is missing (:mod:`fnl_transformers.fairseq_plugin.precision`); ``--amp`` runs with a CPU
``GradScaler`` in the in-process checks. The checks and their tolerances (measured values included) are those of
``fairseq_precision_helpers``; ``test_gpu.py`` runs the same checks on CUDA. Here also: ``fairseq-train`` itself
starts in every cell (in process, 2 updates; marked slow, end to end) with FD logged and the plugin's log line.
"""

import logging

import pytest

import fairseq_helpers as fh

pytest.importorskip("fairseq")

import fairseq_precision_helpers as fp  # noqa: E402


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    return fh.make_tiny_data(tmp_path_factory.mktemp("fairseq_mp_data"))


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.slow
@pytest.mark.parametrize("mode,setup", fp.MATRIX)
def test_fairseq_train_starts_in_every_precision(data_bin, tmp_path, mode, setup):
    argv = fp.train_argv(data_bin, str(tmp_path), setup, mode)
    logging.disable(logging.NOTSET)
    run = fh.run_fairseq_train(argv + ["--max-update", "2", "--no-save", "--disable-validation"])
    assert len(run.train) == 2
    for rec in run.train:
        assert float(rec["loss"]) < 100
        if fp.SETUPS[setup][1]:
            assert {f"fd_{k}" for k in fp.FD_KINDS} <= rec.keys()
    if mode == "fp16":
        assert f"fnl: --optimizer {setup} keeps a decay per parameter" in run.output
    if mode.endswith("bf16"):
        assert "fnl: --bf16 without torch_xla: training in bfloat16 on the CPU" in run.output


@pytest.mark.parametrize("mode,setup", fp.MATRIX + [(mode, "fnl_lamb") for mode in fp.MODES])
def test_first_update_groups_and_fd_equal_float32(data_bin, mode, setup):
    fp.check_first_update(data_bin, mode, setup)


def test_fd_is_float32_under_autocast(data_bin):
    fp.check_fd_is_float32_under_autocast(data_bin)


@pytest.mark.parametrize("mode", fp.SCALED)
@pytest.mark.parametrize("setup", ["fnl_adam", "flambe"])
def test_an_overflowing_update_is_skipped_with_its_fd(data_bin, monkeypatch, mode, setup):
    fp.check_overflow_skipped(data_bin, mode, setup, monkeypatch)


@pytest.mark.parametrize("setup", list(fp.AFTER_50))
def test_50_bf16_updates_stay_close_to_float32(data_bin, setup):
    fp.check_50_updates(data_bin, setup)


def _cfg(data_bin, *flags, optimizer="fnl_adam"):
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = fh.tiny_train_args(data_bin, "unused", "--optimizer", optimizer, *flags)
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), input_args=argv))


def test_only_the_plugins_optimizers_get_per_parameter_copies_and_bf16_leaves_a_real_tpu_alone(data_bin, monkeypatch):
    from fnl_transformers.fairseq_plugin import precision

    cfg = _cfg(data_bin, "--fp16")
    assert precision.per_parameter_copies(cfg) and cfg.common.fp16_no_flatten_grads
    stock = _cfg(data_bin, "--fp16", optimizer="adam")
    assert not precision.per_parameter_copies(stock) and not stock.common.fp16_no_flatten_grads  # fairseq's choice

    bf16 = _cfg(data_bin, "--bf16")
    assert bf16.common.tpu and bf16.distributed_training.tpu and bf16.model.tpu  # fairseq's --bf16 implies --tpu
    monkeypatch.setattr(precision, "_xla_available", lambda: True)
    assert not precision.resolve_bf16(bf16) and bf16.common.tpu  # torch_xla installed: the TPU run is left alone
    monkeypatch.setattr(precision, "_xla_available", lambda: False)
    assert precision.resolve_bf16(bf16)
    assert not (bf16.common.tpu or bf16.distributed_training.tpu or bf16.model.tpu or bf16.optimizer.tpu)
    assert bf16.common.bf16
