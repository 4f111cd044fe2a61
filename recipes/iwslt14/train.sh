#!/usr/bin/env bash
# Train one IWSLT'14 run of the paper (Khodak et al., ICLR 2021, Sec. 6 and Figure 4) with the fairseq plugin.
PROG=train.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

VARIANTS="baseline wd fd-ov fd-qkov lowrank-si-fd lowrank-nosi head-dim-half"
usage() {
  cat <<EOF
usage: recipes/iwslt14/train.sh VARIANT [options] [-- extra fairseq-train arguments]

The paper's IWSLT'14 setting (Sec. 6 and Figure 4; the official code's make.py): the model fnl_transformer_small
(the official transformer_small: 2+2 pre-norm layers, d 256, FFN 1024, 4 heads of 64, learned positions,
separate embeddings, no projection biases, dropout 0.2), NAG at lr 0.25 with an inverse-sqrt schedule
(warmup-init-lr 0.25, 4000 warmup updates), clip-norm 0.1, max-tokens 4000, label smoothing 0.1, 100k updates.
Variants (the lines of Figure 4):
  baseline        no regularization
  wd              weight decay COEF on every parameter (stock NAG --weight-decay)
  fd-ov           Frobenius decay COEF of the attention OV forms (W_o,h W_v,h)
  fd-qkov         FD COEF of the QK (W_q,h W_k,h^T) and OV forms
  lowrank-si-fd   fd-qkov --rank-scale 0.5 --si
  lowrank-nosi    fd-qkov --rank-scale 0.5 --no-si
  head-dim-half   per-head dim halved for QK and OV (heads only), per-head SI, FD COEF of QK/OV
With --rank-scale R (every variant but head-dim-half) one rank scale compresses the model as the official code
does: every FFN layer, token and learned positional embedding and the output projection factorized at rank
round(R min(m, n)), every head shrunk to int(R * 64); the FD variants then also decay every factorized layer (as
the official code does at any R > 0).
Options (each overrides the variant's value):
  --coef X            regularization coefficient (default 1e-4; 0 turns the variant's regularizer off)
  --rank-scale R      compress by one rank scale (default: dense; the lowrank variants: 0.5)
  --si / --no-si      spectral init of the factorized layers and of the QK / OV heads (--spectral-init,
                      --spectral-init-qk, --spectral-init-ov; default: on with --rank-scale; a dense model gets
                      no SI flag unless given, and there --si re-balances each head)
  --rules R           initialization rules: paper (default: --factor-init dense --reduced-heads fresh, the official
                      code's) or library (--factor-init random --reduced-heads truncate, the library's defaults)
  --head-dim D        per-head dim of head-dim-half (default: half of the architecture's)
  --lr X --max-update N --seed N --warmup-updates N --max-tokens N --dropout X --clip-norm X
  --arch A            default fnl_transformer_small; fnl_transformer_iwslt_de_en is fairseq's 6+6-layer
                      IWSLT model (d 512, post-norm, shared embeddings)
  --data DIR          prepare.sh output (default data-bin/iwslt14.de-en; with --smoke data-bin/iwslt14-smoke.de-en)
  --save-dir DIR      default runs/iwslt14/NAME (NAME: the variant plus the overridden coef/rank-scale/SI/seed)
  --smoke             fnl_transformer_small at d 64, FFN 128 (4 heads of 16), 254 positions; Adam lr 3e-3, no
                      dropout, 300 updates: learns the --smoke corpus in ~1-2 min on 2 CPU cores (the paper's
                      optimizer needs far more updates)
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
WARMUP=""; MAX_TOKENS=""; DROPOUT=""; CLIP=""; ARCH=""; SI=""; RULES=paper; EXTRA=()
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
    --si) SI=1; shift ;;
    --no-si) SI=0; shift ;;
    --rules) need_value "$1" $# "${2:-}"; RULES="$2"; shift 2 ;;
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
  [ "$VARIANT" != head-dim-half ] || die "--rank-scale does not apply to head-dim-half (heads only): use --head-dim"
fi
[ -z "$HEAD_DIM" ] || [ "$VARIANT" = head-dim-half ] || die "--head-dim applies to the head-dim-half variant, not $VARIANT"
[ -z "$COEF" ] || [ "$VARIANT" != baseline ] || die "baseline has no regularizer: --coef applies to the other variants"
case "$RULES" in paper|library) ;; *) die "--rules must be paper or library, got '$RULES'" ;; esac
case "$VARIANT" in
  lowrank-si-fd) [ "$SI" != 0 ] || die "lowrank-si-fd is the SI variant: use lowrank-nosi (or fd-qkov --rank-scale R --no-si)"
                 RS="${RS:-0.5}" ;;
  lowrank-nosi) [ "$SI" != 1 ] || die "lowrank-nosi is the no-SI variant: use lowrank-si-fd (or fd-qkov --rank-scale R --si)"
                RS="${RS:-0.5}"; SI=0 ;;
esac

# the paper's setting, or the smoke setting
if [ "$SMOKE" = 1 ]; then
  ARCH="${ARCH:-fnl_transformer_small}"
  MODEL=(--encoder-embed-dim 64 --decoder-embed-dim 64 --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128)
  [ "$ARCH" != fnl_transformer_small ] || MODEL+=(--max-source-positions 254 --max-target-positions 254)
  OPT=(--optimizer adam --adam-betas "(0.9, 0.98)" --lr "${LR:-3e-3}" --lr-scheduler inverse_sqrt
       --warmup-updates "${WARMUP:-100}" --warmup-init-lr 1e-7 --clip-norm "${CLIP:-1.0}")
  DROPOUT="${DROPOUT:-0.0}"; MAX_TOKENS="${MAX_TOKENS:-2000}"; MAX_UPDATE="${MAX_UPDATE:-300}"
  DATA="${DATA:-data-bin/iwslt14-smoke.de-en}"; RUNS=runs/iwslt14-smoke; FULL_HEAD_DIM=16
  # one thread: this model is too small to gain from more, and on a busy machine OpenMP threads spin-wait
  # (measured on 2 shared cores: 60 updates in 12 s with one thread, 177 s with two)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  ARCH="${ARCH:-fnl_transformer_small}"
  MODEL=()
  OPT=(--optimizer nag --lr "${LR:-0.25}" --lr-scheduler inverse_sqrt --warmup-init-lr "${LR:-0.25}"
       --warmup-updates "${WARMUP:-4000}" --clip-norm "${CLIP:-0.1}")
  DROPOUT="${DROPOUT:-0.2}"; MAX_TOKENS="${MAX_TOKENS:-4000}"; MAX_UPDATE="${MAX_UPDATE:-100000}"
  DATA="${DATA:-data-bin/iwslt14.de-en}"; RUNS=runs/iwslt14; FULL_HEAD_DIM=64
  [ "$ARCH" != fnl_transformer_iwslt_de_en ] || FULL_HEAD_DIM=128
fi
case "$ARCH" in fnl_transformer_small|fnl_transformer_iwslt_de_en|fnl_transformer_tiny) ;; *)
  [ -n "$HEAD_DIM" ] || [ "$VARIANT" != head-dim-half ] \
    || die "head-dim-half with --arch $ARCH: give --head-dim D (half its head dim)" ;;
esac
# the paper's model has separate source / target embeddings and learned positions; the others share embeddings
if [ "$ARCH" = fnl_transformer_small ]; then
  EMBED=(); PARTS=ffn,embedding,position,attention
else
  EMBED=(--share-all-embeddings); PARTS=ffn,embedding,attention
fi
[ -f "$DATA/fnl_prepare.json" ] || [ ! -f "$DATA/bin/fnl_prepare.json" ] || DATA="$DATA/bin"
[ -f "$DATA/dict.de.txt" ] || ls "$DATA"/dict.*.txt >/dev/null 2>&1 \
  || die "no prepared data in $DATA: run recipes/iwslt14/prepare.sh$([ "$SMOKE" = 1 ] && echo ' --smoke') first, or pass --data DIR"
DATA="$(cd "$DATA" && pwd)"
[ "$MAX_UPDATE" -ge 1 ] || die "--max-update must be >= 1 (fairseq reads 0 as unlimited); use --untrained for the initialization"

C="${COEF:-1e-4}"; HD="${HEAD_DIM:-$((FULL_HEAD_DIM / 2))}"
CRIT=(--criterion label_smoothed_cross_entropy --label-smoothing 0.1)
FD_CRIT=(--criterion fd_label_smoothed_cross_entropy --label-smoothing 0.1)
# FD at a rank scale also decays every factorized layer (FFN, embeddings, positions, output projection)
LIN=(); [ -z "$RS" ] || LIN=(--fd-linear "$C")
REG=none; VAR=()
case "$VARIANT" in
  baseline) C=0 ;;
  wd) REG=weight_decay; VAR=("${CRIT[@]}" --weight-decay "$C") ;;
  fd-ov) REG=fd; VAR=("${FD_CRIT[@]}" "${LIN[@]}" --fd-ov "$C") ;;
  fd-qkov|lowrank-si-fd|lowrank-nosi) REG=fd; VAR=("${FD_CRIT[@]}" "${LIN[@]}" --fd-qk "$C" --fd-ov "$C") ;;
  head-dim-half) REG=fd; VAR=("${FD_CRIT[@]}" --fd-qk "$C" --fd-ov "$C" --head-dim "$HD"); SI="${SI:-1}" ;;
esac
[ ${#VAR[@]} -gt 0 ] || VAR=("${CRIT[@]}")
# one rank scale compresses every part; SI of the factorized layers and of the QK / OV heads go together
if [ -n "$RS" ]; then VAR+=(--rank-scale "$RS" --factorize "$PARTS"); SI="${SI:-1}"; fi
if [ "$SI" = 1 ]; then
  [ -z "$RS" ] || VAR+=(--spectral-init)
  VAR+=(--spectral-init-qk --spectral-init-ov)
elif [ "$SI" = 0 ]; then
  [ -z "$RS" ] || VAR+=(--no-spectral-init)
  VAR+=(--no-spectral-init-qk --no-spectral-init-ov)
fi
if [ "$RULES" = paper ]; then VAR+=(--factor-init dense --reduced-heads fresh)
else VAR+=(--factor-init random --reduced-heads truncate); fi

NAME="$VARIANT"
[ -z "$COEF" ] || NAME="$NAME-c$COEF"
case "$VARIANT" in
  lowrank-*) [ "$RS" = 0.5 ] || NAME="$NAME-r$RS" ;;
  head-dim-half) ;;
  *) [ -z "$RS" ] || NAME="$NAME-r$RS"; [ -z "$SI" ] || NAME="$NAME-$([ "$SI" = 1 ] && echo si || echo nosi)" ;;
esac
[ "$RULES" = paper ] || NAME="$NAME-library"
[ -z "$HEAD_DIM" ] || NAME="$NAME-h$HEAD_DIM"
[ -z "$SEED" ] || NAME="$NAME-s$SEED"
[ "$UNTRAINED" = 0 ] || NAME="$NAME-untrained"
SAVE_DIR="${SAVE_DIR:-$RUNS/$NAME}"

LOG=(--log-format simple --log-interval "$([ "$SMOKE" = 1 ] && echo 50 || echo 100)")
[ -t 2 ] && LOG=(--log-format tqdm --log-interval 10)  # a progress bar on a terminal
DEVICE=()
has_cuda || DEVICE=(--cpu)
USER_DIR="$(fnl_userdir)"
ARGS=("$DATA" --user-dir "$USER_DIR" --arch "$ARCH" "${EMBED[@]}" "${MODEL[@]}" "${OPT[@]}"
      --dropout "$DROPOUT" --max-tokens "$MAX_TOKENS" --max-update "$MAX_UPDATE" --seed "${SEED:-1}"
      "${VAR[@]}" --save-dir "$SAVE_DIR" --no-epoch-checkpoints --num-workers 0 "${LOG[@]}" "${DEVICE[@]}" "${EXTRA[@]}")

if [ "$DRY" = 1 ]; then
  [ "$ARCH" != fnl_transformer_small ] || [ "$SMOKE" = 1 ] || echo "# $ARCH: the paper's model (the official" \
    "transformer_small): 2+2 pre-norm layers, d 256, FFN 1024, 4 heads of 64, learned positions, separate" \
    "embeddings, no projection biases" >&2
  printf '%q ' fairseq-train "${ARGS[@]}"; echo
  exit 0
fi
mkdir -p "$SAVE_DIR"
SAVE_DIR="$(cd "$SAVE_DIR" && pwd)"
"$PY" - "$SAVE_DIR/recipe.json" "$VARIANT" "$REG" "$C" "${RS:-}" "$DATA" "$SMOKE" "$UNTRAINED" "$ARCH" \
  "${SEED:-1}" "$MAX_UPDATE" "${LR:-}" "$HD" "${SI:-}" "$RULES" "${EXTRA[*]:-}" <<'EOF'
import json, sys
path, variant, reg, coef, rs, data, smoke, untrained, arch, seed, max_update, lr, hd, si, rules, extra = sys.argv[1:]
info = {"recipe": "iwslt14", "variant": variant + (" (untrained)" if untrained == "1" else ""),
        "regularizer": reg, "coef": float(coef), "rank_scale": float(rs) if rs else None,
        "spectral_init": si == "1", "rules": rules,
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
