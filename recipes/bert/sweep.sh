#!/usr/bin/env bash
# Tune the regularization coefficients as the paper did (Sec. 6): on the uncompressed model (full head dim),
# against the held-out MLM loss of pretraining (never SQuAD). One phase-1 run per optimizer x coefficient x seed:
# weight decay for lamb, the OV Frobenius-decay coefficient for lamb-fd and flambe.
#
#   recipes/bert/sweep.sh [--optimizers lamb,lamb-fd,flambe] [--wd-grid 0,1e-4,...] [--fd-grid 1e-4,...]
#                         [--seeds 0,1] [--objective mlm-nsp|mlm] [--out DIR] [--dry-run] [--smoke]
#                         [-- PRETRAIN OPTIONS, e.g. --corpus FILES --max-steps 2000]
# Default --out: runs/bert-sweep (runs/bert-sweep-smoke with --smoke). Finished runs are skipped when started
# again. Writes OUT/RUN/... per run, OUT/selection.json and OUT/selection.md (pass the former to table4.sh).
PROG=sweep.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
[ "${1:-}" != -h ] && [ "${1:-}" != --help ] || exec "$PY" -m fnl_transformers.recipes.bert_runs sweep --help
for a in "$@"; do [ "$a" != --smoke ] || export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; [ "$a" != -- ] || break; done
exec "$PY" -m fnl_transformers.recipes.bert_runs sweep "$@"
