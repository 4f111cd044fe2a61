#!/usr/bin/env bash
# The IWSLT-14 smoke pipeline end to end: prepare --smoke, train two variants (in parallel, one core each),
# evaluate them and the untrained model, write the table and plot. A few minutes on 2 CPU cores.
PROG=demo.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF
usage: recipes/demo.sh [--out DIR] [--variants "V1 V2"] [--max-update N]
  --out DIR         everything goes here (default runs/demo)
  --variants "..."  the train.sh variants to compare (default: "baseline lowrank-si-fd")
  --max-update N    updates per variant (default: train.sh --smoke's, 300)
EOF
}
OUT=runs/demo; VARIANTS="baseline lowrank-si-fd"; MAXUP=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) need_value "$1" $# "${2:-}"; OUT="$2"; shift 2 ;;
    --variants) need_value "$1" $# "${2:-}"; VARIANTS="$2"; shift 2 ;;
    --max-update) need_value "$1" $# "${2:-}"; MAXUP=(--max-update "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START ))s] $*"; }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# generation is capped at 1.2 x source length + 10 tokens: an untrained model would otherwise emit 200 tokens per
# sentence (minutes on a CPU); trained outputs are far shorter than the cap
CAP=(-- --max-len-a 1.2 --max-len-b 10)

stamp "1/4 prepare the synthetic corpus (toy language pair: word mapping + local reordering)"
"$HERE/iwslt14/prepare.sh" --smoke --out "$OUT/data" | sed 's/^/    /'

stamp "2/4 train: $VARIANTS (in parallel, one thread each) + the untrained initialization"
pids=()
for v in $VARIANTS; do
  rm -f "$OUT/$v"/checkpoint_*.results.json
  ( "$HERE/iwslt14/train.sh" "$v" --smoke --data "$OUT/data" --save-dir "$OUT/$v" "${MAXUP[@]}" 2>&1 \
      | sed -u "s/^/    [$v] /" ) &
  pids+=($!)
done
"$HERE/iwslt14/train.sh" baseline --smoke --data "$OUT/data" --save-dir "$OUT/untrained" --untrained "${MAXUP[@]}" \
  | sed "s/^/    [untrained] /"
for pid in "${pids[@]}"; do wait "$pid" || die "training failed (logs: $OUT/*/train.log)"; done
for v in $VARIANTS; do [ -f "$OUT/$v/checkpoint_best.pt" ] || die "training $v failed (log: $OUT/$v/train.log)"; done

stamp "3/4 evaluate on the test set (beam 5, detokenized sacrebleu)"
pids=()
for v in untrained $VARIANTS; do
  ( "$HERE/iwslt14/eval.sh" "$OUT/$v" "${CAP[@]}" 2>/dev/null | sed -u "s/^/    [$v] /" ) &
  pids+=($!)
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}" || true; pids=("${pids[@]:1}"); fi
done
for pid in "${pids[@]}"; do wait "$pid" || true; done
for v in untrained $VARIANTS; do
  ls "$OUT/$v"/checkpoint_*.test.results.json >/dev/null 2>&1 || die "evaluating $v failed (log: $OUT/$v/*.generate.log)"
done

stamp "4/4 table and plot"
"$PY" -m fnl_transformers.recipes.summary "$OUT/untrained" $(for v in $VARIANTS; do echo "$OUT/$v"; done) \
  --out "$OUT" > /dev/null
cat "$OUT/summary.md" | sed -n '/^|/p'
"$PY" - "$OUT" $VARIANTS <<'EOF'
import glob, json, sys
out, variants = sys.argv[1], sys.argv[2:]
score = lambda d: json.load(open(glob.glob(f"{out}/{d}/checkpoint_*.test.results.json")[0]))["bleu"]
untrained = score("untrained")
print(f"\ntest BLEU: untrained {untrained:.2f}; " + "; ".join(f"{v} {score(v):.2f}" for v in variants))
EOF
stamp "done"
echo "table: $OUT/summary.md"
echo "plot:  $OUT/summary.png"
