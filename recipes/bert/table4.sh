#!/usr/bin/env bash
# The paper's Table 4 (Sec. 6): LAMB, LAMB + FD in the loss and FLAMBe, each at full and half head dim (and per
# seed): pretraining phase 1, phase 2, SQuAD v1.1 fine-tuning of the pretrained model, then the table and the
# MLM loss curves.
#
#   recipes/bert/table4.sh [--selection SWEEP_OUT/selection.json] (--squad-train F --squad-dev F |
#                          --squad-dataset squad | --no-squad) [--optimizers ...] [--head-dims full,half]
#                          [--objectives mlm-nsp] [--phases 2] [--seeds 0,1,2] [--out DIR] [--dry-run] [--smoke]
#                          [-- PRETRAIN OPTIONS, e.g. --corpus FILES]
# Default --out: runs/bert-table4 (runs/bert-table4-smoke with --smoke). Finished runs are skipped when started
# again. Writes OUT/RUN/{phase1,phase2,squad}, OUT/summary.md and OUT/bert_mlm_curves.png.
PROG=table4.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
[ "${1:-}" != -h ] && [ "${1:-}" != --help ] || exec "$PY" -m fnl_transformers.recipes.bert_runs table4 --help
for a in "$@"; do [ "$a" != --smoke ] || export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; [ "$a" != -- ] || break; done
exec "$PY" -m fnl_transformers.recipes.bert_runs table4 "$@"
