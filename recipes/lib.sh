# Shared shell helpers for the recipes; sourced, never run. Sets REPO, PY and PATH.
set -euo pipefail

PROG="${PROG:-$(basename "$0")}"
export FNL_PROG="$PROG"  # the Python helpers prefix their error lines with it
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {  # one clear line naming the problem and the fix, exit code 2
  echo "$PROG: error: $*" >&2
  exit 2
}

# Use the repository's virtual environment when the current python lacks the package (make install creates it).
PY="${PYTHON:-python}"
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('torch', 'fnl_transformers')))" 2>/dev/null; then
  if [ -x "$REPO/.venv/bin/python" ]; then
    export PATH="$REPO/.venv/bin:$PATH"
    PY="$REPO/.venv/bin/python"
  else
    die "fnl_transformers is not importable with '$PY': run 'make install' in $REPO or activate its environment"
  fi
fi
PY_BIN_DIR="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")"
export PATH="$PY_BIN_DIR:$PATH"

need_value() {  # need_value OPTION "$#" VALUE: the option's value is missing (or is the next option)
  [ "$2" -ge 2 ] && [[ "${3:-}" != --* ]] || die "$1 needs a value"
}

has_cuda() {  # no GPU device node: no CUDA (skips a torch import); else ask torch
  ls /dev/nvidia[0-9]* /dev/kfd >/dev/null 2>&1 || return 1
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

fnl_userdir() {  # $FNL_USER_DIR when a caller (the sweep) already knows it: one python start less per script
  if [ -n "${FNL_USER_DIR:-}" ] && [ -d "$FNL_USER_DIR" ]; then echo "$FNL_USER_DIR"; return; fi
  local dir
  dir="$(fnl userdir 2>/dev/null)" || die "'fnl userdir' failed: the fairseq plugin (fnl_transformers.fairseq_plugin) is not installed; run 'make install'"
  echo "$dir"
}

json_get() {  # json_get FILE KEY: print a top-level value of a JSON file (empty when absent)
  "$PY" -c "import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print('' if v is None else v)" "$1" "$2"
}
