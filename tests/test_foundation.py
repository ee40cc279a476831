"""The pack loads in the real host: import, ComfyUI's own CI smoke test, node schemas served by a
live server (category, tooltips), and a /prompt round trip through a node of the pack."""

import importlib
import os
import pathlib
import subprocess
import sys
import sysconfig
import tomllib

import pytest

import host

def pack_node_classes():
    import ultrares.nodes

    return ultrares.nodes.node_classes()


def test_pack_imports_and_registers_v3_nodes():
    pack = importlib.import_module("ultrares")
    assert pack.WEB_DIRECTORY == "./web"
    classes = pack_node_classes()
    assert classes, "the pack registers no nodes"
    ids = [c.GET_SCHEMA().node_id for c in classes]
    assert len(ids) == len(set(ids)), f"duplicate node ids: {ids}"
    assert all(i.startswith("UltraRes") for i in ids), ids


def test_patches_import_without_the_host_nodes():
    """patches/ is pure torch: importing it must not pull in ComfyUI's node registry."""
    code = (
        "import sys, pkgutil, importlib; sys.path.insert(0, sys.argv[1]);"
        "import ultrares.patches as p;"
        "[importlib.import_module('ultrares.patches.' + m.name) for m in pkgutil.iter_modules(p.__path__)];"
        "bad = [m for m in sys.modules if m in ('nodes', 'server', 'execution') or m.startswith('comfy_api')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code, str(host.BASE_DIRECTORY / "custom_nodes")], check=True)


def test_pyproject_is_registry_metadata():
    meta = tomllib.loads((host.REPO / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "ultrares"
    major, minor, patch = meta["project"]["version"].split(".")
    assert all(x.isdigit() for x in (major, minor, patch))
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "UltraRes" and comfy["Icon"]
    assert comfy["requires-comfyui"].startswith(">=0.3.75")
    assert "Repository" in meta["project"]["urls"]


def test_host_under_test_is_a_declared_comfyui():
    """The suite runs on a host the pack declares (pyproject `requires-comfyui`); an older one is unsupported."""
    from packaging.specifiers import SpecifierSet

    import comfyui_version

    declared = tomllib.loads((host.REPO / "pyproject.toml").read_text())["tool"]["comfy"]["requires-comfyui"]
    assert comfyui_version.__version__ in SpecifierSet(declared), \
        f"ComfyUI {comfyui_version.__version__} at {host.COMFYUI_DIR} is outside requires-comfyui {declared!r}"


def test_comfy_node_validate_passes(tmp_path):
    """The registry's publishing check, comfy-cli's `comfy node validate` (pinned in tests/requirements-test.txt):
    pyproject metadata, then ruff's exec/eval/one-line-statement rules, which it only prints as warnings."""
    cli = pathlib.Path(sysconfig.get_path("scripts")) / "comfy"
    if not cli.is_file():
        pytest.skip(f"comfy-cli is not installed for {sys.executable}: pip install -r tests/requirements-test.txt")
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / ".config"))  # its settings stay private
    res = subprocess.run([str(cli), "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=host.REPO, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "All validation checks passed" in out and "Security warnings" not in out, out


def test_quick_test_for_ci_passes_with_the_pack(tmp_path):
    """ComfyUI's own smoke test: loads every node (ours included) and exits 0."""
    base = host.make_base_directory(tmp_path)
    cmd = [sys.executable, str(host.COMFYUI_DIR / "main.py"), "--cpu", "--quick-test-for-ci", "--disable-api-nodes",
           "--database-url", "sqlite:///:memory:", "--base-directory", str(base)]
    res = subprocess.run(cmd, cwd=host.COMFYUI_DIR, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = res.stdout + res.stderr
    # The host lists each custom node folder with its import time, "(IMPORT FAILED)" when it broke.
    # (Only ComfyUI's audio nodes fail here: torchaudio has no CPU build.)
    pack_lines = [line for line in log.splitlines() if line.rstrip().endswith(f"custom_nodes/{host.PACK_NAME}")]
    assert pack_lines and not any("IMPORT FAILED" in line for line in pack_lines), log[-3000:]
    assert "ultrares" not in "".join(line for line in log.splitlines() if line.startswith("Cannot import")), log[-3000:]


def test_object_info_lists_every_pack_node_with_tooltips(comfy_server):
    info = comfy_server.get("/object_info")
    expected = {c.GET_SCHEMA().node_id for c in pack_node_classes()}
    missing = expected - info.keys()
    assert not missing, f"nodes missing from the live host: {missing}"
    for node_id in expected:
        entry = info[node_id]
        assert entry["category"].split("/")[0] == "UltraRes", (node_id, entry["category"])
        assert entry.get("description"), f"{node_id} has no description"
        for section in ("required", "optional"):
            for name, spec in entry["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_web_directory_and_help_pages_are_served(comfy_server):
    for c in pack_node_classes():
        node_id = c.GET_SCHEMA().node_id
        assert (host.REPO / "web" / "docs" / f"{node_id}.md").is_file(), f"no help page web/docs/{node_id}.md"
    exts = comfy_server.get("/extensions")
    assert any("/extensions/ultrares/" in e for e in exts) or not list((host.REPO / "web" / "js").glob("*.js"))
