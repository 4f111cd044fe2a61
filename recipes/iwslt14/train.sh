#!/usr/bin/env bash
# Train one IWSLT'14 variant of the paper (Khodak et al., ICLR 2021, Sec. 6 and Figure 4) with the fairseq plugin.
PROG=train.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

VARIANTS="baseline wd fd-ov fd-qkov lowrank-si-fd lowrank-nosi head-dim-half"
usage() {
  cat <<EOF
usage: recipes/iwslt14/train.sh VARIANT [options] [-- extra fairseq-train arguments]

Variants (all use --arch fnl_transformer_iwslt_de_en, the paper's setting: NAG, lr 0.25 inverse-sqrt schedule with
warmup-init-lr 0.25 and 4000 warmup updates, clip-norm 0.1, dropout 0.2, max-tokens 4000, label smoothing 0.1,
100k updates, shared embeddings):
  baseline        no regularization
  wd              weight decay COEF on every parameter (stock NAG --weight-decay)
  fd-ov           Frobenius decay COEF of the attention OV forms (W_o,h W_v,h)
  fd-qkov         FD COEF of the QK (W_q,h W_k,h^T) and OV forms
  lowrank-si-fd   FFN + embeddings factorized at --rank-scale (0.5), spectral init (layers, QK, OV), FD COEF of
                  the factorized layers and the QK/OV forms
  lowrank-nosi    the same with random factors (--no-spectral-init)
  head-dim-half   per-head dim halved (128 -> 64) for QK and OV, per-head SI of the forms, FD COEF of QK/OV
Options (each overrides the variant's value):
  --coef X            regularization coefficient (default 1e-4; the paper sweeps 1e-6 .. 1e-3, tuned on the
                      unfactorized model; 0 turns the variant's regularizer off)
  --rank-scale R      rank scale of the lowrank variants (default 0.5)
  --head-dim D        per-head dim of head-dim-half (default: half of the architecture's)
  --lr X --max-update N --seed N --warmup-updates N --max-tokens N --dropout X --clip-norm X --arch A
  --data DIR          prepare.sh output (default data-bin/iwslt14.de-en; with --smoke data-bin/iwslt14-smoke.de-en)
  --save-dir DIR      default runs/iwslt14/NAME (NAME = VARIANT plus the overridden coef/rank-scale/seed)
  --smoke             tiny model (d 64, 2+2 layers), Adam lr 3e-3, 300 updates: learns the --smoke corpus in ~1-2 min
                      on 2 CPU cores (the paper's optimizer needs far more updates)
  --untrained         save the initialization only (checkpoint_init.pt; update 0) for the untrained BLEU
  --dry-run           print the fairseq-train command and exit
After '--', anything is passed to fairseq-train last (so it wins), e.g. -- --fd-qk 1e-5 --update-freq 2
EOF
}

[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
VARIANT="$1"; shift
case " $VARIANTS " in *" $VARIANT "*) ;; *) die "unknown variant '$VARIANT': choose one of $VARIANTS" ;; esac

DATA=""; SAVE_DIR=""; SMOKE=0; UNTRAINED=0; DRY=0; COEF=""; RS=""; HEAD_DIM=""; LR=""; MAX_UPDATE=""; SEED=""
WARMUP=""; MAX_TOKENS=""; DROPOUT=""; CLIP=""; ARCH=""; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) need_value "$1" $# "${2:-}"; DATA="$2"; shift 2 ;;
    --save-dir) need_value "$1" $# "${2:-}"; SAVE_DIR="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --untrained) UNTRAINED=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --coef) need_value "$1" $# "${2:-}"; COEF="$2"; shift 2 ;;
    --rank-scale) need_value "$1" $# "${2:-}"; RS="$2"; shift 2 ;;
    --head-dim) need_value "$1" $# "${2:-}"; HEAD_DIM="$2"; shift 2 ;;
    --lr) need_value "$1" $# "${2:-}"; LR="$2"; shift 2 ;;
    --max-update) need_value "$1" $# "${2:-}"; MAX_UPDATE="$2"; shift 2 ;;
    --seed) need_value "$1" $# "${2:-}"; SEED="$2"; shift 2 ;;
    --warmup-updates) need_value "$1" $# "${2:-}"; WARMUP="$2"; shift 2 ;;
    --max-tokens) need_value "$1" $# "${2:-}"; MAX_TOKENS="$2"; shift 2 ;;
    --dropout) need_value "$1" $# "${2:-}"; DROPOUT="$2"; shift 2 ;;
    --clip-norm) need_value "$1" $# "${2:-}"; CLIP="$2"; shift 2 ;;
    --arch) need_value "$1" $# "${2:-}"; ARCH="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help; fairseq-train options go after --)" ;;
  esac
done

is_number() { [[ "$1" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]]; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
for pair in "coef:$COEF" "rank-scale:$RS" "lr:$LR" "dropout:$DROPOUT" "clip-norm:$CLIP"; do
  v="${pair#*:}"; [ -z "$v" ] || is_number "$v" || die "--${pair%%:*} must be a non-negative number, got '$v'"
done
for pair in "max-update:$MAX_UPDATE" "seed:$SEED" "warmup-updates:$WARMUP" "max-tokens:$MAX_TOKENS" "head-dim:$HEAD_DIM"; do
  v="${pair#*:}"; [ -z "$v" ] || is_int "$v" || die "--${pair%%:*} must be a non-negative integer, got '$v'"
done
if [ -n "$RS" ]; then
  "$PY" -c "import sys; r=float(sys.argv[1]); sys.exit(0 if r > 0 else 1)" "$RS" \
    || die "--rank-scale must be > 0 (< 1 compresses, >= 1 is overcomplete), got $RS"
  case "$VARIANT" in lowrank-*) ;; *) die "--rank-scale applies to the lowrank-* variants, not $VARIANT" ;; esac
fi
[ -z "$HEAD_DIM" ] || [ "$VARIANT" = head-dim-half ] || die "--head-dim applies to the head-dim-half variant, not $VARIANT"
[ -z "$COEF" ] || [ "$VARIANT" != baseline ] || die "baseline has no regularizer: --coef applies to the other variants"

# the paper's setting, or the smoke setting
if [ "$SMOKE" = 1 ]; then
  ARCH="${ARCH:-fnl_transformer_tiny}"
  MODEL=(--encoder-embed-dim 64 --decoder-embed-dim 64 --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128)
  OPT=(--optimizer adam --adam-betas "(0.9, 0.98)" --lr "${LR:-3e-3}" --lr-scheduler inverse_sqrt
       --warmup-updates "${WARMUP:-100}" --warmup-init-lr 1e-7 --clip-norm "${CLIP:-1.0}")
  DROPOUT="${DROPOUT:-0.0}"; MAX_TOKENS="${MAX_TOKENS:-2000}"; MAX_UPDATE="${MAX_UPDATE:-300}"
  DATA="${DATA:-data-bin/iwslt14-smoke.de-en}"; RUNS=runs/iwslt14-smoke; FULL_HEAD_DIM=16
  # one thread: this model is too small to gain from more, and on a busy machine OpenMP threads spin-wait
  # (measured on 2 shared cores: 60 updates in 12 s with one thread, 177 s with two)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  ARCH="${ARCH:-fnl_transformer_iwslt_de_en}"
  MODEL=()
  OPT=(--optimizer nag --lr "${LR:-0.25}" --lr-scheduler inverse_sqrt --warmup-init-lr "${LR:-0.25}"
       --warmup-updates "${WARMUP:-4000}" --clip-norm "${CLIP:-0.1}")
  DROPOUT="${DROPOUT:-0.2}"; MAX_TOKENS="${MAX_TOKENS:-4000}"; MAX_UPDATE="${MAX_UPDATE:-100000}"
  DATA="${DATA:-data-bin/iwslt14.de-en}"; RUNS=runs/iwslt14; FULL_HEAD_DIM=128
fi
[ "$ARCH" = fnl_transformer_iwslt_de_en ] || [ "$ARCH" = fnl_transformer_tiny ] || [ -n "$HEAD_DIM" ] \
  || [ "$VARIANT" != head-dim-half ] || die "head-dim-half with --arch $ARCH: give --head-dim D (half its head dim)"
[ -f "$DATA/fnl_prepare.json" ] || [ ! -f "$DATA/bin/fnl_prepare.json" ] || DATA="$DATA/bin"
[ -f "$DATA/dict.de.txt" ] || ls "$DATA"/dict.*.txt >/dev/null 2>&1 \
  || die "no prepared data in $DATA: run recipes/iwslt14/prepare.sh$([ "$SMOKE" = 1 ] && echo ' --smoke') first, or pass --data DIR"
DATA="$(cd "$DATA" && pwd)"
[ "$MAX_UPDATE" -ge 1 ] || die "--max-update must be >= 1 (fairseq reads 0 as unlimited); use --untrained for the initialization"

C="${COEF:-1e-4}"; R="${RS:-0.5}"; HD="${HEAD_DIM:-$((FULL_HEAD_DIM / 2))}"
CRIT=(--criterion label_smoothed_cross_entropy --label-smoothing 0.1)
FD_CRIT=(--criterion fd_label_smoothed_cross_entropy --label-smoothing 0.1)
REG=none; VAR=()
case "$VARIANT" in
  baseline) C=0 ;;
  wd) REG=weight_decay; VAR=("${CRIT[@]}" --weight-decay "$C") ;;
  fd-ov) REG=fd; VAR=("${FD_CRIT[@]}" --fd-ov "$C") ;;
  fd-qkov) REG=fd; VAR=("${FD_CRIT[@]}" --fd-qk "$C" --fd-ov "$C") ;;
  lowrank-si-fd) REG=fd; VAR=("${FD_CRIT[@]}" --fd-linear "$C" --fd-qk "$C" --fd-ov "$C" --rank-scale "$R"
                               --spectral-init --spectral-init-qk --spectral-init-ov) ;;
  lowrank-nosi) REG=fd; VAR=("${FD_CRIT[@]}" --fd-linear "$C" --fd-qk "$C" --fd-ov "$C" --rank-scale "$R"
                              --no-spectral-init) ;;
  head-dim-half) REG=fd; VAR=("${FD_CRIT[@]}" --fd-qk "$C" --fd-ov "$C" --head-dim "$HD"
                               --spectral-init-qk --spectral-init-ov) ;;
esac
[ ${#VAR[@]} -gt 0 ] || VAR=("${CRIT[@]}")

NAME="$VARIANT"
[ -z "$COEF" ] || NAME="$NAME-c$COEF"
[ -z "$RS" ] || NAME="$NAME-r$RS"
[ -z "$HEAD_DIM" ] || NAME="$NAME-h$HEAD_DIM"
[ -z "$SEED" ] || NAME="$NAME-s$SEED"
[ "$UNTRAINED" = 0 ] || NAME="$NAME-untrained"
SAVE_DIR="${SAVE_DIR:-$RUNS/$NAME}"

LOG=(--log-format simple --log-interval "$([ "$SMOKE" = 1 ] && echo 50 || echo 100)")
[ -t 2 ] && LOG=(--log-format tqdm --log-interval 10)  # a progress bar on a terminal
DEVICE=()
has_cuda || DEVICE=(--cpu)
USER_DIR="$(fnl_userdir)"
ARGS=("$DATA" --user-dir "$USER_DIR" --arch "$ARCH" --share-all-embeddings "${MODEL[@]}" "${OPT[@]}"
      --dropout "$DROPOUT" --max-tokens "$MAX_TOKENS" --max-update "$MAX_UPDATE" --seed "${SEED:-1}"
      "${VAR[@]}" --save-dir "$SAVE_DIR" --no-epoch-checkpoints --num-workers 0 "${LOG[@]}" "${DEVICE[@]}" "${EXTRA[@]}")

if [ "$DRY" = 1 ]; then
  printf '%q ' fairseq-train "${ARGS[@]}"; echo
  exit 0
fi
mkdir -p "$SAVE_DIR"
SAVE_DIR="$(cd "$SAVE_DIR" && pwd)"
"$PY" - "$SAVE_DIR/recipe.json" "$VARIANT" "$REG" "$C" "${RS:-}" "$DATA" "$SMOKE" "$UNTRAINED" "$ARCH" \
  "${SEED:-1}" "$MAX_UPDATE" "${LR:-}" "$HD" "${EXTRA[*]:-}" <<'EOF'
import json, sys
path, variant, reg, coef, rs, data, smoke, untrained, arch, seed, max_update, lr, hd, extra = sys.argv[1:]
lowrank = variant.startswith("lowrank")
info = {"recipe": "iwslt14", "variant": variant + (" (untrained)" if untrained == "1" else ""),
        "regularizer": reg, "coef": float(coef), "rank_scale": float(rs or 0.5) if lowrank else None,
        "spectral_init": variant in ("lowrank-si-fd", "head-dim-half"),
        "head_dim": int(hd) if variant == "head-dim-half" else None, "data": data, "smoke": smoke == "1",
        "untrained": untrained == "1", "arch": arch, "seed": int(seed), "max_update": int(max_update),
        "lr": float(lr) if lr else None, "extra_args": extra}
json.dump(info, open(path, "w"), indent=2)
EOF
if [ "$UNTRAINED" = 1 ]; then
  "$PY" -m fnl_transformers.recipes.fairseq_init "$SAVE_DIR/checkpoint_init.pt" -- "${ARGS[@]}" 2> "$SAVE_DIR/init.log" \
    || { err="$(grep -E "^[A-Za-z.]*(Error|Exception)" "$SAVE_DIR/init.log" | tail -1)"
         die "could not build the model${err:+: $err} (log: $SAVE_DIR/init.log)"; }
  echo "evaluate with: recipes/iwslt14/eval.sh $SAVE_DIR/checkpoint_init.pt"
  exit 0
fi
# a finished run with the same command is not trained again (fairseq would resume and add one update)
COMMAND="$(printf '%q ' fairseq-train "${ARGS[@]}")"
if [ -f "$SAVE_DIR/train.done" ] && [ "$(cat "$SAVE_DIR/train.done")" = "$COMMAND" ] && [ -f "$SAVE_DIR/checkpoint_best.pt" ]; then
  echo "already trained: $SAVE_DIR/checkpoint_best.pt (same command; delete $SAVE_DIR/train.done to train again)"
  exit 0
fi
rm -f "$SAVE_DIR/train.done"
echo "training $VARIANT -> $SAVE_DIR (log: $SAVE_DIR/train.log)"
set +e
if [ -t 2 ]; then  # fairseq's tqdm progress bar
  fairseq-train "${ARGS[@]}" 2>&1 | tee "$SAVE_DIR/train.log"
  status=${PIPESTATUS[0]}
else  # the per-interval and validation lines only
  fairseq-train "${ARGS[@]}" 2>&1 | tee "$SAVE_DIR/train.log" \
    | grep --line-buffered -E "train_inner|valid on|done training" | cut -c1-200
  status=${PIPESTATUS[0]}
fi
set -e
if [ "$status" != 0 ]; then
  err="$(grep -E "^[A-Za-z]*(Error|Exception)" "$SAVE_DIR/train.log" | tail -1)"
  die "fairseq-train failed${err:+: $err} (log: $SAVE_DIR/train.log)"
fi
[ -f "$SAVE_DIR/checkpoint_best.pt" ] || die "fairseq-train wrote no checkpoint_best.pt (log: $SAVE_DIR/train.log)"
echo "$COMMAND" > "$SAVE_DIR/train.done"
echo "trained: $SAVE_DIR/checkpoint_best.pt (evaluate with: recipes/iwslt14/eval.sh $SAVE_DIR)"
