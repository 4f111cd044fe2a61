#!/usr/bin/env bash
# Evaluate a trained checkpoint: fairseq-generate (beam 5), sentencepiece removal, detokenized sacrebleu BLEU
# (one process for every subset asked: fairseq and the model load once).
PROG=eval.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

usage() {
  cat <<EOF
usage: recipes/iwslt14/eval.sh CHECKPOINT|SAVE_DIR [options]

A SAVE_DIR means its checkpoint_best.pt (else checkpoint_last.pt, else checkpoint_init.pt of --untrained).
Writes CHECKPOINT_STEM.SUBSET.results.json next to the checkpoint: BLEU, sacrebleu signature, parameter counts,
the run's settings (recipe.json of train.sh); and CHECKPOINT_STEM.SUBSET.hyp.txt (detokenized hypotheses).
Options:
  --data DIR        prepared data (default: the one the checkpoint was trained on)
  --subset S        test (default), valid, or both: valid,test
  --beam N          beam size (default 5)
  --batch-size N    sentences per batch (default 128)
  --lenpen X        length penalty (default 1)
  --ref FILE        reference text (default: the cleaned SUBSET target text from prepare.sh)
After '--', anything is passed to fairseq-generate last.
EOF
}

[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
TARGET="$1"; shift
DATA=""; SUBSET=test; BEAM=5; BATCH=128; LENPEN=1; REF=""; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) need_value "$1" $# "${2:-}"; DATA="$2"; shift 2 ;;
    --subset) need_value "$1" $# "${2:-}"; SUBSET="$2"; shift 2 ;;
    --beam) need_value "$1" $# "${2:-}"; BEAM="$2"; shift 2 ;;
    --batch-size) need_value "$1" $# "${2:-}"; BATCH="$2"; shift 2 ;;
    --lenpen) need_value "$1" $# "${2:-}"; LENPEN="$2"; shift 2 ;;
    --ref) need_value "$1" $# "${2:-}"; REF="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help; fairseq-generate options go after --)" ;;
  esac
done
SUBSETS="${SUBSET//,/ }"
for s in $SUBSETS; do case "$s" in test|valid) ;; *) die "--subset must be test, valid or valid,test, got '$SUBSET'" ;; esac; done
[ -z "$REF" ] || [ "$(echo $SUBSETS | wc -w)" = 1 ] || die "--ref FILE gives the references of one subset: evaluate one --subset at a time"
[[ "$BEAM" =~ ^[1-9][0-9]*$ ]] || die "--beam must be a positive integer, got '$BEAM'"
[[ "$BATCH" =~ ^[1-9][0-9]*$ ]] || die "--batch-size must be a positive integer, got '$BATCH'"

if [ -d "$TARGET" ]; then
  CKPT=""
  for name in checkpoint_best.pt checkpoint_last.pt checkpoint_init.pt; do
    [ -f "$TARGET/$name" ] && { CKPT="$TARGET/$name"; break; }
  done
  [ -n "$CKPT" ] || die "no checkpoint_best.pt, checkpoint_last.pt or checkpoint_init.pt in $TARGET: train it with recipes/iwslt14/train.sh first"
elif [ -f "$TARGET" ]; then
  CKPT="$TARGET"
else
  die "checkpoint not found: $TARGET (give a .pt file or a train.sh save directory)"
fi
CKPT="$(cd "$(dirname "$CKPT")" && pwd)/$(basename "$CKPT")"
# a file that is not a fairseq checkpoint: one line now, not a KeyError deep inside fairseq-generate
"$PY" -m fnl_transformers.checkpoints fairseq "$CKPT" || exit 2
DIR="$(dirname "$CKPT")"; STEM="$(basename "$CKPT" .pt)"
RECIPE="$DIR/recipe.json"

if [ -z "$DATA" ]; then
  [ -f "$RECIPE" ] && DATA="$(json_get "$RECIPE" data)"
  [ -n "$DATA" ] || die "no recipe.json beside $CKPT to find its data: pass --data DIR (the prepare.sh output)"
fi
[ -f "$DATA/fnl_prepare.json" ] || [ ! -f "$DATA/bin/fnl_prepare.json" ] || DATA="$DATA/bin"
[ -d "$DATA" ] || die "data directory not found: $DATA (pass --data DIR, the prepare.sh output)"
DATA="$(cd "$DATA" && pwd)"
REFS=""
for s in $SUBSETS; do
  ref="$REF"
  if [ -z "$ref" ]; then
    [ -f "$DATA/fnl_prepare.json" ] || die "$DATA has no fnl_prepare.json (not made by prepare.sh): pass --ref FILE with the $s references"
    ref="$(json_get "$DATA/fnl_prepare.json" "${s}_ref")"
  fi
  [ -f "$ref" ] || die "reference file not found: $ref (pass --ref FILE)"
  REFS="${REFS:+$REFS,}$ref"
done

DEVICE=()
has_cuda || DEVICE=(--cpu)
# smoke models are tiny: one thread (see train.sh)
[ -f "$RECIPE" ] && [ "$(json_get "$RECIPE" smoke)" = True ] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
USER_DIR="$(fnl_userdir)"
"$PY" -m fnl_transformers.recipes.fairseq_eval --checkpoint "$CKPT" --data "$DATA" --subsets "${SUBSETS// /,}" \
  --refs "$REFS" --beam "$BEAM" --batch-size "$BATCH" --lenpen "$LENPEN" --user-dir "$USER_DIR" \
  --recipe-json "$RECIPE" "${DEVICE[@]}" -- "${EXTRA[@]}" || exit 2
