#!/usr/bin/env bash
# The paper's Figure 4 grid (Khodak et al., ICLR 2021, Sec. 6; the official code's make.py): train every run with
# train.sh, evaluate it on valid and test with eval.sh, draw both panels (fig4_top.png, fig4_bottom.png, fig4.md).
# Options: --dry-run --smoke --only LINES --scales S --seeds N --gpus 0,1,... --jobs N --out DIR --data DIR
# --max-update N [-- extra train.sh arguments]; --help for details (fnl_transformers/recipes/sweep.py).
PROG=sweep.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
exec "$PY" -m fnl_transformers.recipes.sweep "$@"
