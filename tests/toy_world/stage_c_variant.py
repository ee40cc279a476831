"""Run a toy StageC script on another configuration of ComfyUI's StageC class, for experiments:

    STAGE_C='{"self_attn": [true, false]}' .venv/bin/python tests/toy_world/stage_c_variant.py \\
        tests/toy_world/train_cascade.py base --steps 1400 --out /tmp/variant.safetensors

$STAGE_C (JSON) updates nodes/toy_cascade.py's STAGE_C before the script runs; pass the same value to
check_cascade.py for the file it trained. The shipped configuration is the one without overrides.
"""

import json
import os
import pathlib
import runpy
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import host  # noqa: E402,F401  (the real ComfyUI host on CPU, with the pack importable)
from ultrares.nodes import toy_cascade  # noqa: E402

if __name__ == "__main__":
    toy_cascade.STAGE_C.update(json.loads(os.environ.get("STAGE_C", "{}")))
    script, *sys.argv = sys.argv[1:]
    sys.argv.insert(0, script)
    runpy.run_path(script, run_name="__main__")
