"""``fnl compress MODEL_DIR OUT_DIR``: SI-compress a pretrained HuggingFace model and save it.

Factorizes the FFN (and by default embedding) layers at ``--rank-scale`` (or the scale that keeps
``--target-param-ratio`` of the parameters) and shrinks attention heads to ``--head-dim`` with per-head
spectral initialization, prints the per-layer table (ranks, parameters, relative approximation error) and
saves the model to OUT_DIR with every other file of MODEL_DIR (tokenizer, sentence-transformers modules such as
``modules.json`` and ``1_Pooling/``; not the original weights). OUT_DIR is marked so that plain transformers
refuses it (:mod:`fnl_transformers.hf.guard`); reload it with ``fnl_transformers.hf.from_pretrained(OUT_DIR)``.
OUT_DIR appears only once it is complete. Every option and text file is checked (by the core settings model, the
validator ``FNLConfig`` uses, and the core's text rule) before torch and transformers are imported.

``--calibration FILE`` (one text per line) truncates activation-aware (``FNLConfig(activation_aware=True)``: each
layer and head form in the norm of its outputs on these texts; ``--damping``), and reports the output-level
fidelity to the original model (cosine of mean-pooled hidden states, nearest-neighbour agreement, masked /
next-token LM loss: :mod:`fnl_transformers.hf.fidelity`) on the calibration texts, or on ``--eval-text FILE``
(which alone measures weight-only SI). The fidelity is stored in the plan, so ``fnl inspect`` shows it too.
"""

from __future__ import annotations

import os
import shutil
import tempfile


def add_arguments(parser) -> None:
    parser.add_argument(
        "model_dir",
        help="a save_pretrained directory of a supported model (BERT, RoBERTa, "
        "DistilBERT, GPT-2, Llama, Mistral, Qwen2)",
    )
    parser.add_argument("out_dir", help="where to save the compressed model (must not exist, or be empty)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rank-scale", type=float, help="rank = round(scale * min(m, n)) per layer, in (0, 1]")
    size.add_argument(
        "--target-param-ratio",
        type=float,
        help="choose the rank scale that keeps this fraction of the parameters, in (0, 1]",
    )
    parser.add_argument("--head-dim", type=int, help="reduced per-head dimension of every attention head")
    parser.add_argument("--head-dim-qk", type=int, help="reduced per-head dimension of the QK forms only")
    parser.add_argument("--head-dim-ov", type=int, help="reduced per-head dimension of the OV forms only")
    parser.add_argument(
        "--factorize",
        default="ffn,embedding",
        help="comma-separated parts to factorize at the rank scale: ffn, embedding, position "
        "(learned position tables), attention (default: ffn,embedding)",
    )
    parser.add_argument(
        "--calibration",
        metavar="FILE",
        help="UTF-8 text file, one text per line: truncate each layer in the norm of its outputs on "
        "these texts (activation-aware) and report the output fidelity on them",
    )
    parser.add_argument(
        "--damping",
        type=float,
        help="with --calibration: damping of the inputs' second moment C + damping * mean(diag C) * I (default 0.01)",
    )
    parser.add_argument(
        "--eval-text",
        metavar="FILE",
        help="UTF-8 text file, one text per line: report the output fidelity to the original model on "
        "these texts (default: the --calibration texts)",
    )


def _option(name: str) -> str:
    """Settings as this command spells them (activation-aware truncation is asked for with --calibration)."""
    from ..core.settings import flag

    return "--calibration FILE" if name == "activation_aware" else flag(name)


def run(args) -> int:
    from ..core.settings import specs_from_flat  # torch-free
    from ..core.texts import read_texts

    if not os.path.isdir(args.model_dir):
        raise FileNotFoundError(f"MODEL_DIR {args.model_dir} is not a directory")
    if os.path.exists(args.out_dir) and (not os.path.isdir(args.out_dir) or os.listdir(args.out_dir)):
        raise ValueError(f"OUT_DIR {args.out_dir} already exists and is not empty; choose a new directory")
    if args.rank_scale is not None and not 0 < args.rank_scale <= 1:
        raise ValueError(f"--rank-scale must be in (0, 1] to compress, got {args.rank_scale}")
    if (
        args.rank_scale is None
        and args.target_param_ratio is None
        and args.head_dim is None
        and args.head_dim_qk is None
        and args.head_dim_ov is None
    ):
        raise ValueError("nothing to compress: give --rank-scale or --target-param-ratio, and/or --head-dim")
    flat = dict(
        rank_scale=args.rank_scale,
        target_param_ratio=args.target_param_ratio,
        factorize=args.factorize,
        head_dim=args.head_dim,
        head_dim_qk=args.head_dim_qk,
        head_dim_ov=args.head_dim_ov,
        activation_aware=args.calibration is not None,
        damping=args.damping,
    )
    flat = {k: v for k, v in flat.items() if v is not None}
    specs_from_flat(flat, namer=_option)  # FNLConfig's validation, spelled as options, before the heavy imports
    calibration = None if args.calibration is None else read_texts(args.calibration, "--calibration")
    evaluation = calibration if args.eval_text is None else read_texts(args.eval_text, "--eval-text")

    import copy

    from transformers.utils import logging as hf_logging

    from ..hf.apply import patch_model
    from ..hf.config import FNLConfig
    from ..hf.fidelity import fidelity_report
    from ..hf.files import copy_non_weight_files
    from ..hf.guard import mark_checkpoint
    from ..hf.persist import record_fidelity
    from ..hf.report import format_table

    config = FNLConfig(**flat)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # stdout is the table, stderr only errors
    try:
        model = load_vanilla(args.model_dir)
        tokenizer = None if evaluation is None else load_tokenizer(args.model_dir)
        reference = None if evaluation is None else copy.deepcopy(model)  # the original, for the fidelity report
        patch_model(model, config, calibration=None if calibration is None else (tokenizer, calibration))
        if reference is not None:
            record_fidelity(model, fidelity_report(reference, model, tokenizer, evaluation))
            del reference
        print(format_table(model.config.fnl_config))
        if evaluation is None:
            print(
                "output fidelity not measured: give --eval-text FILE (or --calibration FILE) to compare the "
                "compressed model's outputs with the original's"
            )
        parent = os.path.dirname(os.path.abspath(args.out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".fnl-compress-", dir=parent)
        try:
            model.save_pretrained(tmp)  # a patched model's save_pretrained marks the directory
            mark_checkpoint(tmp)  # (idempotent: stated here, as this command's output must be marked)
            copied, skipped = copy_non_weight_files(args.model_dir, tmp)
            if os.path.isdir(args.out_dir):
                os.rmdir(args.out_dir)  # empty (checked above)
            os.replace(tmp, args.out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    print(
        f"saved to {args.out_dir} with {len(copied)} other files of MODEL_DIR"
        + (f" (not copied, weights of the original: {', '.join(skipped)})" if skipped else "")
        + f"; load it with fnl_transformers.hf.from_pretrained({args.out_dir!r})"
    )
    return 0


def load_tokenizer(model_dir: str):
    """The tokenizer saved in ``model_dir`` (needed for --calibration / --eval-text)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{model_dir} has no usable tokenizer ({reason}); --calibration and --eval-text need the "
            "model's tokenizer files in MODEL_DIR"
        ) from None


def load_vanilla(model_dir: str):
    """The model of ``model_dir`` with the class its config names (``architectures``), else ``AutoModel``."""
    import transformers
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except OSError as exc:
        raise ValueError(f"{model_dir} is not a saved transformers model ({exc})") from None
    if isinstance(getattr(config, "fnl_config", None), dict):
        raise ValueError(f"{model_dir} is already a fnl_transformers checkpoint; compress the original model")
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    return (cls or AutoModel).from_pretrained(model_dir)
