#!/usr/bin/env bash
# BERT pretraining with LAMB, LAMB + FD in the loss, or FLAMBe (decoupled FD on the attention OV forms, weight
# decay elsewhere), full or half per-head dimension (Khodak et al., ICLR 2021, Sec. 6 and Table 4), on NVIDIA's
# two-phase LAMB schedule.
#
#   recipes/bert/pretrain.sh {lamb|lamb-fd|flambe} [--head-dim full|half|D] [--objective mlm-nsp|mlm]
#                            [--phase 1|2] (--corpus FILE... | --dataset NAME | --smoke) [--out DIR] [--help]
# Default --out: runs/bert/OPTIMIZER-HEADDIM-OBJECTIVE-pPHASE (runs/bert-smoke/... with --smoke); --phase 2
# resumes the matching phase-1 directory unless --resume DIR is given. Writes OUT/model (loadable with
# fnl_transformers.hf.from_pretrained, and by recipes/bert/squad.sh --model OUT/model), OUT/optimizer.pt,
# OUT/loss_curve.json and OUT/mlm.eval.results.json.
PROG=pretrain.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

case "${1:-}" in
  lamb|lamb-fd|flambe) ;;
  -h|--help|"") exec "$PY" -m fnl_transformers.recipes.bert_pretrain --help ;;
  *) die "the first argument is the optimizer: lamb, lamb-fd or flambe, got '$1'" ;;
esac
ARGS=("$@"); OUT=""; RESUME=""; SMOKE=0; HEAD=full; OBJECTIVE=mlm-nsp; PHASE=1
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[$i]}" in
    --out) OUT="${ARGS[$((i + 1))]:-}" ;;
    --resume) RESUME="${ARGS[$((i + 1))]:-}" ;;
    --smoke) SMOKE=1 ;;
    --head-dim) HEAD="${ARGS[$((i + 1))]:-}" ;;
    --objective) OBJECTIVE="${ARGS[$((i + 1))]:-}" ;;
    --phase) PHASE="${ARGS[$((i + 1))]:-}" ;;
  esac
done
EXTRA=()
RUNS="runs/bert$([ "$SMOKE" = 1 ] && echo -smoke)/$1-$HEAD-$OBJECTIVE"
[ -n "$OUT" ] || EXTRA+=(--out "$RUNS-p$PHASE")
[ "$PHASE" != 2 ] || [ -n "$RESUME" ] || EXTRA+=(--resume "$RUNS-p1")
# the smoke model is tiny: one thread (OpenMP threads only spin-wait on a busy machine)
[ "$SMOKE" = 0 ] || export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PY" -m fnl_transformers.recipes.bert_pretrain "${ARGS[@]}" "${EXTRA[@]}"
