"""Bring the real ComfyUI host into this process, on CPU, with this pack importable as `ultrares`.

COMFYUI_DIR names the host (default: the project's provisioned `.comfyui/`). The pack is exposed to
Python and to the host through links in a private base directory, so a user's checkout is never
modified and the in-process host sees only this pack among custom nodes.
"""

import asyncio
import os
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
COMFYUI_DIR = pathlib.Path(os.environ.get("COMFYUI_DIR", REPO / ".comfyui")).resolve()
PACK_NAME = "ultrares"


def make_base_directory(root: pathlib.Path) -> pathlib.Path:
    """A ComfyUI --base-directory holding only this pack among custom nodes."""
    (root / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = root / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    for sub in ("models/checkpoints", "models/diffusion_models", "models/vae", "models/loras", "input", "output", "temp", "user"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


_BASE = make_base_directory(pathlib.Path(tempfile.mkdtemp(prefix="ultrares-host-")))


def _bootstrap():
    if not (COMFYUI_DIR / "main.py").is_file():
        raise RuntimeError(f"No ComfyUI host at {COMFYUI_DIR}: run `bash tests/setup_host.sh` or set COMFYUI_DIR")
    sys.path.insert(0, str(COMFYUI_DIR))
    sys.path.insert(0, str(_BASE / "custom_nodes"))  # `import ultrares`
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    # Must be set before comfy.model_management / folder_paths are imported.
    args.cpu = os.environ.get("ULTRARES_HOST_DEVICE", "cpu") == "cpu"  # tests/bench/gpu_4k.py sets "cuda"
    args.use_pytorch_cross_attention = True
    args.base_directory = str(_BASE)
    args.disable_all_custom_nodes = True
    args.whitelist_custom_nodes = [PACK_NAME]
    args.disable_api_nodes = True
    import comfy.model_management  # noqa: F401
    import folder_paths  # noqa: F401


_bootstrap()
BASE_DIRECTORY = _BASE

_nodes_ready = False


def load_nodes() -> dict:
    """Initialise the host's node registry (built-ins plus this pack) once; return NODE_CLASS_MAPPINGS."""
    global _nodes_ready
    import nodes

    if not _nodes_ready:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        _nodes_ready = True
    return nodes.NODE_CLASS_MAPPINGS


def run_node(node_class, **inputs):
    """Execute a node class the way the host does (V3 `execute` or V1 FUNCTION); return its outputs tuple."""
    if hasattr(node_class, "FUNCTION") and not hasattr(node_class, "define_schema"):
        return getattr(node_class(), node_class.FUNCTION)(**inputs)
    out = node_class.execute(**inputs)
    if asyncio.iscoroutine(out):
        out = asyncio.run(out)
    return out.args if hasattr(out, "args") else out
