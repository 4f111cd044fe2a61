"""Shared setup of the fairseq questions (items 2, 3, 6): plugin check, synthetic data, in-process trainers.

The data are synthetic (no corpus is downloaded): sentences of Zipf-distributed words over a fixed
``VOCAB``-word dictionary (IWSLT'14 de-en's BPE vocabularies have 6.6k-8.8k types), binarized with
``fairseq-preprocess``; timing only, nothing is learned from them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import subprocess
import sys
from typing import List, Optional, Sequence

VOCAB = 8000
MODEL, ARCH, CRITERION = "fnl_transformer", "fnl_transformer_iwslt_de_en", "fd_label_smoothed_cross_entropy"


def plugin_status() -> Optional[str]:
    """None when fairseq and the fnl plugin (model, arch, FD criterion, recompose) are usable, else why not."""
    try:
        import fairseq  # noqa: F401
        from fairseq.criterions import CRITERION_REGISTRY
        from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY

        import fnl_transformers.fairseq_plugin  # noqa: F401  (registers the plugin)
    except Exception as e:  # ImportError, or a plugin that fails to import
        return f"plugin not available ({type(e).__name__}: {e})"
    missing = [
        n
        for n, reg in ((MODEL, MODEL_REGISTRY), (ARCH, ARCH_MODEL_REGISTRY), (CRITERION, CRITERION_REGISTRY))
        if n not in reg
    ]
    try:
        from fnl_transformers.fairseq_plugin.recompose import recompose_checkpoint  # noqa: F401
    except Exception:
        missing.append("fnl recompose")
    return f"plugin not available (missing: {', '.join(missing)})" if missing else None


@contextlib.contextmanager
def quiet():
    """fairseq logs at INFO and prints; keep the bench output to its JSON."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(old)


def make_data(root: str, n_train: int, n_test: int = 32, mean_len: int = 24, vocab: int = VOCAB, seed: int = 0) -> str:
    """Write and binarize a synthetic src->tgt corpus under ``root``; returns the data-bin folder.
    Sentence lengths are ``N(mean_len, (mean_len / 6)^2)``, so ``--max-tokens`` batches carry little padding."""
    data_bin = os.path.join(root, "data-bin")
    if os.path.exists(os.path.join(data_bin, "DONE")):
        return data_bin
    raw = os.path.join(root, "raw")
    os.makedirs(raw, exist_ok=True)
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(vocab)]  # Zipf
    words = [f"w{i}" for i in range(vocab)]
    with open(os.path.join(raw, "dict.txt"), "w") as f:
        for i, w in enumerate(words):
            f.write(f"{w} {vocab - i}\n")
    for split, n in (("train", n_train), ("valid", 8), ("test", n_test)):
        for lang in ("src", "tgt"):
            with open(os.path.join(raw, f"{split}.{lang}"), "w") as f:
                for _ in range(n):
                    length = max(3, min(2 * mean_len, int(rng.gauss(mean_len, mean_len / 6))))  # little padding
                    f.write(" ".join(rng.choices(words, weights, k=length)) + "\n")
    from fairseq import options
    from fairseq_cli import preprocess

    d = os.path.join(raw, "dict.txt")
    args = options.get_preprocessing_parser().parse_args(
        [
            "--source-lang",
            "src",
            "--target-lang",
            "tgt",
            "--trainpref",
            os.path.join(raw, "train"),
            "--validpref",
            os.path.join(raw, "valid"),
            "--testpref",
            os.path.join(raw, "test"),
            "--destdir",
            data_bin,
            "--srcdict",
            d,
            "--tgtdict",
            d,
            "--workers",
            "1",
        ]
    )
    with quiet():
        preprocess.main(args)
    open(os.path.join(data_bin, "DONE"), "w").close()
    return data_bin


def user_dir() -> str:
    from fnl_transformers.userdir import user_dir_path

    return user_dir_path()


def train_argv(
    data_bin: str, save_dir: str, arch: str, *extra: str, max_tokens: int = 2048, tie_output: bool = True
) -> List[str]:
    """fairseq-train flags of the IWSLT'14 de-en recipe (CPU, no dropout so runs are comparable); ``tie_output``:
    the decoder's output projection shares its input embedding (``--share-decoder-input-output-embed``)."""
    return [
        data_bin,
        "--task",
        "translation",
        "--source-lang",
        "src",
        "--target-lang",
        "tgt",
        "--arch",
        arch,
        *(["--share-decoder-input-output-embed"] if tie_output else []),
        "--optimizer",
        "adam",
        "--adam-betas",
        "(0.9, 0.98)",
        "--lr",
        "5e-4",
        "--lr-scheduler",
        "inverse_sqrt",
        "--warmup-updates",
        "4000",
        "--criterion",
        "label_smoothed_cross_entropy",
        "--label-smoothing",
        "0.1",
        "--max-tokens",
        str(max_tokens),
        "--dropout",
        "0",
        "--attention-dropout",
        "0",
        "--activation-dropout",
        "0",
        "--seed",
        "1",
        "--cpu",
        "--num-workers",
        "0",
        "--save-dir",
        save_dir,
        "--no-progress-bar",
        "--log-interval",
        "1",
        "--no-epoch-checkpoints",
        "--user-dir",
        user_dir(),
        *extra,
    ]


def with_flags(argv: Sequence[str], **flags) -> List[str]:
    """Replace (or add) ``--flag value`` pairs; ``None`` removes a flag."""
    argv = list(argv)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
        if value is not None:
            argv += [flag, str(value)]
    return argv


class Run:
    """Task, model, criterion and fairseq ``Trainer`` built in this process exactly as ``fairseq-train`` does."""

    def __init__(self, argv: Sequence[str]):
        from fairseq import options, tasks, utils
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf
        from fairseq.trainer import Trainer

        with quiet():
            args = options.parse_args_and_arch(options.get_training_parser(), input_args=[str(a) for a in argv])
            cfg = convert_namespace_to_omegaconf(args)
            utils.set_torch_seed(cfg.common.seed)
            self.task = tasks.setup_task(cfg.task)
            self.model = self.task.build_model(cfg.model)
            self.criterion = self.task.build_criterion(cfg.criterion)
            self.trainer = Trainer(cfg, self.task, self.model, self.criterion)
            self.task.load_dataset("train", combine=True, epoch=1)
        self.cfg = cfg

    def samples(self, n: int) -> list:
        """The first ``n`` training batches (``--max-tokens`` each), on the trainer's device."""
        with quiet():
            itr = self.trainer.get_train_iterator(epoch=1, load_dataset=False).next_epoch_itr(shuffle=False)
        out = []
        for sample in itr:
            out.append(sample)
            if len(out) == n:
                break
        return out

    def step(self, sample) -> None:
        from fairseq import metrics

        with metrics.aggregate("train_inner"), quiet():
            self.trainer.train_step([sample])


def train_flops(run: Run, sample) -> int:
    """Matmul FLOPs of one forward + backward on ``sample`` (``torch.utils.flop_counter``)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    run.model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _, _ = run.criterion(run.model, sample)
        loss.backward()
    run.model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    return counter.get_total_flops()


def fairseq_cli(module: str, argv: Sequence[str], timeout: float = 900) -> str:
    """``python -m <module> argv`` in a subprocess (fresh fairseq registries); returns its output."""
    res = subprocess.run(
        [sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True, timeout=timeout
    )
    if res.returncode != 0:
        raise RuntimeError(f"{module} failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-4000:]}")
    return res.stdout + res.stderr


# model size per mode: the IWSLT'14 de-en architecture (d 512, FFN 1024, 4 heads, 6 + 6 layers), or a tiny one
QUICK_DIMS = [
    "--encoder-embed-dim",
    "32",
    "--encoder-ffn-embed-dim",
    "64",
    "--encoder-layers",
    "1",
    "--encoder-attention-heads",
    "4",
    "--decoder-embed-dim",
    "32",
    "--decoder-ffn-embed-dim",
    "64",
    "--decoder-layers",
    "1",
    "--decoder-attention-heads",
    "4",
]


def setting(quick: bool) -> dict:
    if quick:
        return dict(vocab=300, n_train=96, mean_len=10, max_tokens=256, dims=QUICK_DIMS)
    return dict(vocab=VOCAB, n_train=600, mean_len=24, max_tokens=2048, dims=[])


def skipped_rows(cases, target: str, reason: str) -> List[dict]:
    from .common import skipped

    return [skipped(case, target, reason) for case in cases]
