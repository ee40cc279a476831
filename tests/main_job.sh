#!/usr/bin/env bash
# The main job, from nothing: provisions the host (tests/setup_host.sh), then queues the bundled toy-world
# 4x workflow headless through a real ComfyUI server and prints the repetition figures (tests/main_job.py).
# Arguments go to tests/main_job.py (e.g. --sdxl /path/to/sdxl.safetensors for the real 4K workflow).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tests/setup_host.sh"
set -a; source "$root/.host.env"; set +a
exec "$COMFYUI_PYTHON" "$root/tests/main_job.py" "$@"
