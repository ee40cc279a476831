"""Fixtures over the real ComfyUI host (see tests/host.py): in-process nodes and tiny models, and a
headless server process with a tiny SD1.5 checkpoint and the pack's own toy world."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import host  # noqa: E402  (imports the host's `comfy` on CPU)
import tiny_models  # noqa: E402
from comfy_server import ComfyServer  # noqa: E402


@pytest.fixture(scope="session")
def node_classes():
    """The host's NODE_CLASS_MAPPINGS with built-ins and this pack loaded."""
    return host.load_nodes()


@pytest.fixture
def sd15():
    return tiny_models.tiny_sd15()


@pytest.fixture
def sdxl():
    return tiny_models.tiny_sdxl()


@pytest.fixture
def flux():
    return tiny_models.tiny_flux()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("server-base")
    host.make_base_directory(base)
    tiny_models.write_tiny_sd15_checkpoint(base / "models" / "checkpoints" / "tiny_sd15.safetensors")
    (base / "models" / "diffusion_models" / "tiny_sd15.safetensors").symlink_to(base / "models" / "checkpoints" / "tiny_sd15.safetensors")
    with ComfyServer(base) as server:
        yield server
