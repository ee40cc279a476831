#!/usr/bin/env bash
# Run the whole suite against any ComfyUI checkout and say what was tested:
#   bash tests/check_comfyui.sh /path/to/ComfyUI [--venv DIR | --python PY] [pytest args]
# --venv DIR provisions DIR for that checkout (torch 2.13.0, its requirements, the test tools; see
# tests/setup_host.sh) and runs the suite with it; --python PY uses an existing interpreter that has
# them (default: python3). Prints the ComfyUI version (and commit, for a git checkout) and pytest's
# summary; exits with pytest's status. docs/compatibility.md lists the versions checked so far.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage="usage: bash tests/check_comfyui.sh /path/to/ComfyUI [--venv DIR | --python PY] [pytest args]"
[[ $# -ge 1 && -d "$1" ]] || { echo "$usage" >&2; exit 2; }
export COMFYUI_DIR="$(cd "$1" && pwd)"; shift
unset COMFYUI_VENV
case "${1:-}" in
  --venv) [[ $# -ge 2 ]] || { echo "$usage" >&2; exit 2; }; export COMFYUI_VENV="$2"; shift 2 ;;
  --python) [[ $# -ge 2 ]] || { echo "$usage" >&2; exit 2; }; export COMFYUI_PYTHON="$2"; shift 2 ;;
esac

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
rc=0
bash "$root/tests/run_tests.sh" -rfE "$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}

source "$root/.host.env"  # the python setup_host.sh settled on
version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFYUI_DIR/comfyui_version.py" 2>/dev/null || true)"
commit="$(git -C "$COMFYUI_DIR" rev-parse --short=12 HEAD 2>/dev/null || echo "not a git checkout")"
torch="$("$COMFYUI_PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "?")"
echo "== ComfyUI ${version:-unknown version} ($commit) at $COMFYUI_DIR, python $COMFYUI_PYTHON, torch $torch"
echo "== pytest: $(grep -E '(passed|failed|errors?|skipped|no tests ran).* in [0-9.]+s' "$log" | tail -1 | tr -d '=' | xargs)"
exit $rc
