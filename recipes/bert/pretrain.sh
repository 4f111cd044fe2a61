#!/usr/bin/env bash
# Masked-LM pretraining of BERT: Lamb vs FLAMBe (decoupled FD on the attention OV forms, regular decay elsewhere),
# full or half per-head dimension (Khodak et al., ICLR 2021, Sec. 6).
#
#   recipes/bert/pretrain.sh {lamb|flambe} [--head-dim full|half|D] (--corpus FILE... | --dataset NAME | --smoke)
#                            [--out DIR] [options: --help]
# Default --out: runs/bert/OPTIMIZER-HEADDIM (runs/bert-smoke/... with --smoke). Writes OUT/model (loadable with
# fnl_transformers.hf.from_pretrained, and by recipes/bert/squad.sh --model OUT/model) and OUT/mlm.eval.results.json.
PROG=pretrain.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

case "${1:-}" in
  lamb|flambe) ;;
  -h|--help|"") exec "$PY" -m fnl_transformers.recipes.bert_pretrain --help ;;
  *) die "the first argument is the optimizer: lamb or flambe, got '$1'" ;;
esac
ARGS=("$@"); OUT=""; SMOKE=0; HEAD=full
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[$i]}" in
    --out) OUT="${ARGS[$((i + 1))]:-}" ;;
    --smoke) SMOKE=1 ;;
    --head-dim) HEAD="${ARGS[$((i + 1))]:-}" ;;
  esac
done
EXTRA=()
if [ -z "$OUT" ]; then
  OUT="runs/bert$([ "$SMOKE" = 1 ] && echo -smoke)/$1-$HEAD"
  EXTRA=(--out "$OUT")
fi
# the smoke model is tiny: one thread (OpenMP threads only spin-wait on a busy machine)
[ "$SMOKE" = 0 ] || export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PY" -m fnl_transformers.recipes.bert_pretrain "${ARGS[@]}" "${EXTRA[@]}"
