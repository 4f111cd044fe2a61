"""``fnl recompose CHECKPOINT OUT.pt``: multiply out an fnl_transformer checkpoint into fairseq's stock
``transformer`` (loads in fairseq-generate / -interactive / hub without ``--user-dir``, same translations).

The math is in :mod:`fnl_transformers.fairseq_plugin.recompose`. Bad input (missing, text or non-fairseq file,
existing output) is one ``fnl recompose: error: ...`` line, reported before fairseq is imported; the output is
written atomically.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.description = __doc__.split("\n\n")[0].replace("\n", " ")
    parser.add_argument(
        "checkpoint", help="checkpoint of a fnl_transformer* model (e.g. checkpoints/checkpoint_best.pt)"
    )
    parser.add_argument("output", help="where to write the stock transformer checkpoint (a new file)")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")


def run(args) -> int:
    from ..checkpoints import check_fairseq_checkpoint, check_output

    check_fairseq_checkpoint(args.checkpoint)
    check_output(args.checkpoint, args.output, args.force)
    from ..fairseq_plugin.recompose import recompose_checkpoint  # imports fairseq

    info = recompose_checkpoint(args.checkpoint, args.output, overwrite=args.force)
    print(
        f"wrote {args.output}: fairseq transformer, {info['stock_params']:,} parameters "
        f"(fnl model: {info['fnl_params']:,}), {info['num_updates']} updates; max relative output difference "
        f"on a random batch {info['max_rel_diff']:.2e}"
    )
    return 0
