#!/usr/bin/env bash
# Prepare IWSLT'14 (or any parallel corpus) for fairseq: clean + length filter, one joint sentencepiece model,
# fairseq-preprocess --joined-dictionary. Idempotent: a second run with the same settings reuses every stage.
PROG=prepare.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

usage() {
  cat <<EOF
usage: recipes/iwslt14/prepare.sh [--raw-dir DIR | --smoke] [options]

Data source (one of):
  (default)         download the standard IWSLT'14 de-en archive (needs internet), fairseq's split
  --raw-dir DIR     your corpus: DIR/{train,valid,test}.{SRC,TGT}, one sentence per line, line-aligned
  --smoke           generate a learnable synthetic language pair (offline, seconds)
Options:
  --src L / --tgt L         language suffixes (default de / en)
  --out DIR                 output (default data-bin/iwslt14.SRC-TGT, with --smoke data-bin/iwslt14-smoke.SRC-TGT);
                            fairseq data goes to OUT/bin
  --vocab-size N            joint sentencepiece vocabulary (default 10000; 500 with --smoke)
  --spm-model-type T        bpe (default) or unigram
  --max-len N --ratio R     drop train/valid pairs longer than N words or with length ratio > R (175, 1.5)
  --workers N               fairseq-preprocess workers (default: CPU count)
  --url URL                 archive to download (default: $DEFAULT_URL)
  --force                   rebuild OUT from scratch (a download is kept)
EOF
}

DEFAULT_URL="http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
SRC=de; TGT=en; RAW_DIR=""; SMOKE=0; OUT=""; VOCAB=""; MODEL_TYPE=bpe; MAX_LEN=175; RATIO=1.5
WORKERS="$(nproc 2>/dev/null || echo 1)"; URL="$DEFAULT_URL"; FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --raw-dir) need_value "$1" $# "${2:-}"; RAW_DIR="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --src) need_value "$1" $# "${2:-}"; SRC="$2"; shift 2 ;;
    --tgt) need_value "$1" $# "${2:-}"; TGT="$2"; shift 2 ;;
    --out) need_value "$1" $# "${2:-}"; OUT="$2"; shift 2 ;;
    --vocab-size) need_value "$1" $# "${2:-}"; VOCAB="$2"; shift 2 ;;
    --spm-model-type) need_value "$1" $# "${2:-}"; MODEL_TYPE="$2"; shift 2 ;;
    --max-len) need_value "$1" $# "${2:-}"; MAX_LEN="$2"; shift 2 ;;
    --ratio) need_value "$1" $# "${2:-}"; RATIO="$2"; shift 2 ;;
    --workers) need_value "$1" $# "${2:-}"; WORKERS="$2"; shift 2 ;;
    --url) need_value "$1" $# "${2:-}"; URL="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[ -n "$RAW_DIR" ] && [ "$SMOKE" = 1 ] && die "give --raw-dir or --smoke, not both"
[[ "$VOCAB" =~ ^[0-9]*$ ]] || die "--vocab-size must be a positive integer, got '$VOCAB'"
[[ "$MAX_LEN" =~ ^[0-9]+$ ]] || die "--max-len must be a positive integer, got '$MAX_LEN'"
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, got '$WORKERS'"
[[ "$SRC" =~ ^[A-Za-z_]+$ && "$TGT" =~ ^[A-Za-z_]+$ ]] || die "--src/--tgt must be language suffixes like de, en"
case "$MODEL_TYPE" in bpe|unigram) ;; *) die "--spm-model-type must be bpe or unigram, got '$MODEL_TYPE'" ;; esac
if [ "$SMOKE" = 1 ]; then
  VOCAB="${VOCAB:-500}"; OUT="${OUT:-data-bin/iwslt14-smoke.$SRC-$TGT}"; SOURCE="smoke"
elif [ -n "$RAW_DIR" ]; then
  VOCAB="${VOCAB:-10000}"; OUT="${OUT:-data-bin/iwslt14.$SRC-$TGT}"
  [ -d "$RAW_DIR" ] || die "--raw-dir $RAW_DIR is not a directory"
  RAW_DIR="$(cd "$RAW_DIR" && pwd)"; SOURCE="raw:$RAW_DIR"
  "$PY" -m fnl_transformers.recipes.textprep check "$RAW_DIR" --src "$SRC" --tgt "$TGT" || exit 2
else
  VOCAB="${VOCAB:-10000}"; OUT="${OUT:-data-bin/iwslt14.$SRC-$TGT}"; SOURCE="download:$URL"
  case "$SRC-$TGT" in de-en|en-de) ;; *) die "the download is IWSLT'14 de-en; for $SRC-$TGT give --raw-dir DIR" ;; esac
fi
[ "$VOCAB" -ge 8 ] || die "--vocab-size must be at least 8, got $VOCAB"

SETTINGS="src=$SRC tgt=$TGT source=$SOURCE vocab=$VOCAB spm=$MODEL_TYPE max_len=$MAX_LEN ratio=$RATIO"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# settings.txt records a finished preparation (written last); settings.pending the one in progress, whose finished
# stages a rerun with the same settings reuses. A failed run with other settings is discarded, never a reason to refuse.
clear_stages() {
  rm -rf "$OUT/raw" "$OUT/raw.tmp" "$OUT/clean" "$OUT/clean.tmp" "$OUT/spm" "$OUT/spm.tmp" "$OUT/bin" "$OUT/bin.tmp" \
    "$OUT/spm.model" "$OUT/spm.vocab" "$OUT/settings.txt" "$OUT/settings.pending"
}
if [ "$FORCE" = 1 ]; then
  clear_stages
elif [ -f "$OUT/bin/fnl_prepare.json" ]; then
  [ ! -f "$OUT/settings.txt" ] || [ "$(cat "$OUT/settings.txt")" = "$SETTINGS" ] \
    || die "$OUT was prepared with other settings ($(cat "$OUT/settings.txt")); use --out NEW_DIR, or --force to rebuild it"
  echo "already prepared: $OUT/bin (reusing it; --force rebuilds)"
  exit 0
else
  unfinished=""
  for f in "$OUT/settings.pending" "$OUT/settings.txt"; do  # settings.txt without bin/: an older unfinished run
    [ -f "$f" ] && [ "$(cat "$f")" != "$SETTINGS" ] && unfinished="$(cat "$f")"
  done
  if [ -n "$unfinished" ]; then
    echo "discarding an unfinished preparation in $OUT with other settings ($unfinished)"
    clear_stages
  fi
fi
rm -f "$OUT/settings.txt"
echo "$SETTINGS" > "$OUT/settings.pending"

# 1. raw text
if [ "$SMOKE" = 1 ] || [ -z "$RAW_DIR" ]; then
  if [ ! -f "$OUT/raw/.done" ]; then
    rm -rf "$OUT/raw" "$OUT/raw.tmp"
    if [ "$SMOKE" = 1 ]; then
      "$PY" -m fnl_transformers.recipes.synthetic parallel "$OUT/raw.tmp" --src "$SRC" --tgt "$TGT"
    else
      mkdir -p "$OUT/orig"
      ARCHIVE="$OUT/orig/$(basename "$URL")"
      if [ ! -f "$ARCHIVE" ]; then
        echo "downloading $URL"
        "$PY" -m fnl_transformers.recipes.textprep download "$URL" "$ARCHIVE" || exit 2
      fi
      tar -xzf "$ARCHIVE" -C "$OUT/orig" || die "cannot unpack $ARCHIVE: delete it and run again"
      "$PY" -m fnl_transformers.recipes.textprep extract-iwslt "$OUT/orig" "$OUT/raw.tmp" --src "$SRC" --tgt "$TGT" \
        --pair de-en || exit 2
    fi
    touch "$OUT/raw.tmp/.done"
    mv "$OUT/raw.tmp" "$OUT/raw"
  fi
  RAW_DIR="$OUT/raw"
fi

# 2. clean + length filter (test is never filtered)
if [ ! -f "$OUT/clean/.done" ]; then
  rm -rf "$OUT/clean" "$OUT/clean.tmp"
  "$PY" -m fnl_transformers.recipes.textprep clean "$RAW_DIR" "$OUT/clean.tmp" --src "$SRC" --tgt "$TGT" \
    --max-len "$MAX_LEN" --ratio "$RATIO" || exit 2
  touch "$OUT/clean.tmp/.done"
  mv "$OUT/clean.tmp" "$OUT/clean"
fi

# 3. one joint sentencepiece model on the training text
if [ ! -f "$OUT/spm.model" ]; then
  "$PY" -m fnl_transformers.recipes.textprep spm-train "$OUT/clean" "$OUT/spm" --src "$SRC" --tgt "$TGT" \
    --vocab-size "$VOCAB" --model-type "$MODEL_TYPE" || exit 2
fi

# 4. apply it
if [ ! -f "$OUT/spm/.done" ]; then
  rm -rf "$OUT/spm" "$OUT/spm.tmp"
  "$PY" -m fnl_transformers.recipes.textprep spm-encode "$OUT/spm.model" "$OUT/clean" "$OUT/spm.tmp" --src "$SRC" --tgt "$TGT"
  touch "$OUT/spm.tmp/.done"
  mv "$OUT/spm.tmp" "$OUT/spm"
fi

# 5. binarize with one joined dictionary
rm -rf "$OUT/bin.tmp"
echo "fairseq-preprocess -> $OUT/bin"
fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --joined-dictionary \
  --trainpref "$OUT/spm/train" --validpref "$OUT/spm/valid" --testpref "$OUT/spm/test" \
  --destdir "$OUT/bin.tmp" --workers "$WORKERS" > "$OUT/preprocess.log" 2>&1 \
  || { tail -5 "$OUT/preprocess.log" >&2; die "fairseq-preprocess failed (log: $OUT/preprocess.log)"; }
"$PY" - "$OUT" "$SRC" "$TGT" "$VOCAB" "$SOURCE" "$SMOKE" <<'EOF'
import json, os, sys
out, src, tgt, vocab, source, smoke = sys.argv[1:]
count = lambda p: sum(1 for _ in open(p, encoding="utf-8"))
info = {"src": src, "tgt": tgt, "vocab_size": int(vocab), "source": source, "smoke": smoke == "1",
        "spm_model": os.path.join(out, "spm.model"), "clean_dir": os.path.join(out, "clean"),
        "test_ref": os.path.join(out, "clean", f"test.{tgt}"), "valid_ref": os.path.join(out, "clean", f"valid.{tgt}"),
        "pairs": {s: count(os.path.join(out, "clean", f"{s}.{src}")) for s in ("train", "valid", "test")}}
json.dump(info, open(os.path.join(out, "bin.tmp", "fnl_prepare.json"), "w"), indent=2)
EOF
mv "$OUT/bin.tmp" "$OUT/bin"
mv "$OUT/settings.pending" "$OUT/settings.txt"
echo "prepared: $OUT/bin (train on it with recipes/iwslt14/train.sh VARIANT --data $OUT/bin)"
