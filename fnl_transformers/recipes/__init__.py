"""Python helpers for the shell recipes in ``recipes/`` (IWSLT-14 translation, BERT pretraining, SQuAD).

One module per concern, each runnable with ``python -m fnl_transformers.recipes.<module> --help``:

- ``synthetic``: learnable synthetic corpora for ``--smoke`` (parallel text, MLM text, SQuAD-format JSON).
- ``textprep``: raw parallel text checks, cleaning and length filtering, joint sentencepiece.
- ``fairseq_eval``: ``fairseq-generate`` in-process on valid / test, detokenized sacrebleu BLEU, results JSONs with
  parameter counts.
- ``fairseq_init``: the untrained checkpoint of a training command line (the "no learning" contrast).
- ``squad_metric``: the official SQuAD v1.1 exact match / F1 (answer normalization, max over answers).
- ``squad``: SQuAD v1.1 fine-tuning and evaluation (``recipes/bert/squad.sh``).
- ``bert_pretrain``: masked-LM pretraining, Lamb vs FLAMBe, full or half head dim (``recipes/bert/pretrain.sh``).
- ``summary``: results JSONs -> markdown table + PNG plots (score vs parameters, score vs coefficient).
- ``figure4``: the paper's Figure 4 grid (the official ``make.py``'s) and both panels drawn from its results.
- ``sweep``: ``recipes/iwslt14/sweep.sh``: train and evaluate the Figure 4 grid, then draw it.

Importing this package imports neither fairseq nor transformers.
"""

import os as _os
import sys as _sys


def run_cli(run, args, prog: str, errors) -> int:
    """``run(args)``; an expected error (``errors``) becomes one ``PROG: error: ...`` line and exit code 2
    (``PROG`` is the calling shell script's name, ``$FNL_PROG``, when set)."""
    try:
        run(args)
    except errors as exc:
        print(f"{_os.environ.get('FNL_PROG', prog)}: error: {exc}", file=_sys.stderr)
        return 2
    return 0
