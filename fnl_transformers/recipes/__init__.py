"""Python helpers for the shell recipes in ``recipes/`` (IWSLT-14 translation, BERT pretraining, SQuAD).

One module per concern, each runnable with ``python -m fnl_transformers.recipes.<module> --help``:

- ``synthetic``: learnable synthetic corpora for ``--smoke`` (parallel text, MLM text, SQuAD-format JSON).
- ``textprep``: raw parallel text checks, cleaning and length filtering, joint sentencepiece.
- ``fairseq_eval``: ``fairseq-generate`` in-process on valid / test, detokenized sacrebleu BLEU, results JSONs with
  parameter counts.
- ``fairseq_init``: the untrained checkpoint of a training command line (the "no learning" contrast).
- ``squad_metric``: the official SQuAD v1.1 exact match / F1 (answer normalization, max over answers).
- ``squad``: SQuAD v1.1 fine-tuning and evaluation (``recipes/bert/squad.sh``).
- ``bert_data``: pretraining data: documents of sentences, held-out split, MLM blocks, next-sentence pairs.
- ``schedule``: NVIDIA's BERT learning-rate schedule (linear warmup, polynomial decay).
- ``bert_pretrain``: BERT pretraining with LAMB, LAMB + FD in the loss or FLAMBe, full or half head dim,
  NVIDIA's two phases (``recipes/bert/pretrain.sh``).
- ``bert_runs``: the coefficient sweep and the Table 4 grid in one process (``recipes/bert/sweep.sh``,
  ``recipes/bert/table4.sh``).
- ``summary``: results JSONs -> markdown table + PNG plots (score vs parameters, score vs coefficient);
  ``bert_table``: BERT runs in the layout of Table 4 with their MLM loss curves.
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
