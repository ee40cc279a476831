#!/usr/bin/env bash
# The whole test suite, from nothing: provisions the host (tests/setup_host.sh), then runs pytest
# with the host's python. Extra arguments go to pytest (e.g. one test file). Exit 5 (no tests collected) is a failure.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tests/setup_host.sh"
set -a; source "$root/.host.env"; set +a
cd "$root"
rc=0
"$COMFYUI_PYTHON" -m pytest "$@" || rc=$?  # paths default to pyproject testpaths (tests/)
if [[ $rc -eq 5 ]]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit $rc
