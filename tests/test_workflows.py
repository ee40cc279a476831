"""The bundled workflows and the headless client, against a live ComfyUI host.

- Every UI workflow converts to API form with the live /object_info (known node types, valid
  widget values, the real model file names present as stand-ins), and its API twin equals that.
- Every API workflow runs end to end with tiny models, same node chain, sizes scaled down:
  * SDXL / SD1.5: CheckpointLoaderSimple -> the pack's Toy World Loader (MODEL, VAE) and the two
    CLIPTextEncode -> its positive / negative conditioning (no SDXL text encoder can be made small).
    Sizes x1/8 for SDXL (4096 -> 512 px, 2x the toy's native 256, so every method still runs
    above native size; the 1024 base pass becomes 128) and x1/4 for SD1.5 (2048 -> 512). Dilation presets are
    the reference's tables for SD1.5 (4 levels) or SDXL; the toy UNet is SD1.x with 3 levels, so they become 'auto'.
  * FLUX: UNETLoader + DualCLIPLoader/CLIPTextEncode -> tests/testkit's tiny FLUX DiT and its
    conditioning (ComfyUI's FLUX detection needs the full width); ae.safetensors is a 16-channel
    TAESD and the URAE adapters are tiny ones at the real file names, so the VAE Loader, LoRA
    loader and 4K Adapter Loader run unchanged. Size x1/32 (4096 -> 128 px).
  * PASD (SD1.5 4x upscale): the toy world with PASD files of its shapes, x1/16 (4096 -> 256 px), the
    tile size scaled alike, so the 4K path (tiles) runs.
  * Stable Cascade: both CheckpointLoaderSimple -> tests/testkit's tiny StageC (with conditioning of the
    text encoder's shape) and tiny StageB + StageA, all ComfyUI's own classes; ultrapixel_t2i is a tiny
    file in the released layout and format. Size x1/8 (4096 -> 512 px; the LR pass keeps its 24x24 LR latent).
  * every KSampler runs 4 steps instead of 20-50.
- The client: success (images downloaded, CLI), a validation error, a failed run, an
  interrupted run, an unreachable server.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import build_workflows
import host
import workflow_host
from comfy_server import free_port
from ultrares import client

WORKFLOWS = host.REPO / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
TEST_STEPS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with workflow_host.server(tmp_path_factory.mktemp("workflow-host")) as srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def ui_workflow(name):
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def api_workflow(name):
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


# ---- files and conversion --------------------------------------------------------------------

def test_every_workflow_ships_ui_api_and_thumbnail():
    assert NAMES == sorted(b.__name__ for b in build_workflows.BUILDERS), "workflows/ and tests/build_workflows.py disagree"
    assert sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")) == NAMES
    for name in NAMES:
        thumb = WORKFLOWS / f"{name}.jpg"  # the template browser asks for <name>.jpg
        assert thumb.stat().st_size < 40_000, f"{thumb.name} is {thumb.stat().st_size} bytes"
        with Image.open(thumb) as img:
            assert img.format == "JPEG" and img.width >= 200


def test_template_browser_serves_the_workflows_and_thumbnails(server):
    listed = server.get("/workflow_templates")
    assert sorted(listed.get(host.PACK_NAME, [])) == NAMES, listed
    assert server.get(f"/api/workflow_templates/{host.PACK_NAME}/{NAMES[0]}.json") == ui_workflow(NAMES[0])
    assert server.get(f"/api/workflow_templates/{host.PACK_NAME}/{NAMES[0]}.jpg")[:2] == b"\xff\xd8"


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_converts_on_the_live_host_and_matches_its_api_twin(name, object_info):
    ui = ui_workflow(name)
    api = client.ui_to_api(ui, object_info)  # raises on an unknown node type or an invalid widget value
    assert api == api_workflow(name), f"workflows/api/{name}.json is stale: run tests/build_workflows.py"
    # the UI file is self-consistent, as the frontend checks on load
    nodes = {n["id"]: n for n in ui["nodes"]}
    for link_id, src, slot, dst, dst_slot, kind in ui["links"]:
        assert link_id in nodes[src]["outputs"][slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id and nodes[dst]["inputs"][dst_slot]["type"] == kind
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == len(ui["links"])
    notes = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and all(word in notes[0] for word in ("Needs", "VRAM", "estimated", "Time"))
    decoders = {n["class_type"] for n in api.values()} & {"VAEDecode", "VAEDecodeTiled", "UltraResExactVAEDecode"}
    assert decoders and ("VAEDecode" not in decoders or name.startswith("toy_world")), "4K graphs need a tiled decode"


def test_converter_splices_ui_only_nodes(object_info):
    """Reroute, a PrimitiveNode driving a widget, a bypassed and a muted node, a Note."""
    ui = {"nodes": [
        {"id": 1, "type": "UltraResToyWorldLoader", "inputs": [], "widgets_values": ["square"]},
        {"id": 2, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 1}], "outputs": [{"type": "MODEL"}]},
        {"id": 3, "type": "PrimitiveNode", "inputs": [], "outputs": [{"type": "INT"}], "widgets_values": [7, "fixed"]},
        {"id": 4, "type": "FreeU", "mode": 4, "inputs": [{"name": "model", "type": "MODEL", "link": 2}],
         "outputs": [{"type": "MODEL"}], "widgets_values": [1.1, 1.2, 0.9, 0.2]},
        {"id": 5, "type": "KSampler", "title": "Sampler", "inputs": [
            {"name": "model", "type": "MODEL", "link": 3}, {"name": "positive", "type": "CONDITIONING", "link": 4},
            {"name": "negative", "type": "CONDITIONING", "link": 5}, {"name": "latent_image", "type": "LATENT", "link": 6},
            {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 7}],
         "widgets_values": [123, "randomize", 20, 4.0, "euler", "normal", 1.0]},
        {"id": 6, "type": "EmptyLatentImage", "inputs": [], "widgets_values": [256, 256, 1]},
        {"id": 7, "type": "VAEDecode", "mode": 2, "inputs": [{"name": "samples", "type": "LATENT", "link": 8}], "widgets_values": []},
        {"id": 8, "type": "Note", "inputs": [], "widgets_values": ["text"]},
    ], "links": [[1, 1, 0, 2, 0, "*"], [2, 2, 0, 4, 0, "MODEL"], [3, 4, 0, 5, 0, "MODEL"], [4, 1, 1, 5, 1, "CONDITIONING"],
                 [5, 1, 2, 5, 2, "CONDITIONING"], [6, 6, 0, 5, 3, "LATENT"], [7, 3, 0, 5, 4, "INT"], [8, 5, 0, 7, 0, "LATENT"]]}
    api = client.ui_to_api(ui, object_info)
    assert sorted(api) == ["1", "5", "6"]
    assert api["5"]["inputs"] == {"model": ["1", 0], "seed": 7, "steps": 20, "cfg": 4.0, "sampler_name": "euler",
                                  "scheduler": "normal", "positive": ["1", 1], "negative": ["1", 2],
                                  "latent_image": ["6", 0], "denoise": 1.0}
    assert api["5"]["_meta"]["title"] == "Sampler" and api["6"]["_meta"]["title"] == "Empty Latent Image"

    ui["nodes"][4]["widgets_values"][4] = "not_a_sampler"
    ui["nodes"].append({"id": 9, "type": "NoSuchNode", "inputs": []})
    with pytest.raises(client.ValidationFailed) as err:
        client.ui_to_api(ui, object_info)
    assert "node 5 (KSampler): input 'sampler_name': 'not_a_sampler' is not one of" in str(err.value)
    assert "node 9: unknown node type 'NoSuchNode'" in str(err.value)


# ---- end to end with tiny models -------------------------------------------------------------

def redirect(api, old, new):
    for node in api.values():
        for name, value in node["inputs"].items():
            if value == old:
                node["inputs"][name] = list(new)


def with_tiny_models(api: dict) -> tuple[dict, float]:
    """The graph with the swaps listed in the module docstring; returns it and the size factor."""
    api = json.loads(json.dumps(api))
    factor = 1 / 2  # the toy demo: 1024 -> 512 px
    for nid, node in list(api.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple" and inputs["ckpt_name"] in (build_workflows.CASCADE_C, build_workflows.CASCADE_B):
            factor = 1 / 8
            api[nid] = {"class_type": "UltraResTestTinyCascadeLoader",
                        "inputs": {"stage": "c" if inputs["ckpt_name"] == build_workflows.CASCADE_C else "b", "seed": 0}}
            redirect(api, [nid, 2], [nid, 3])  # VAE
        elif kind == "CheckpointLoaderSimple":
            factor = 1 / 8 if inputs["ckpt_name"] == build_workflows.SDXL_CKPT else 1 / 4
            api[nid] = {"class_type": "UltraResToyWorldLoader", "inputs": {"shape": "disk"}}
            redirect(api, [nid, 2], [nid, 3])  # VAE
        elif kind == "UNETLoader":
            factor = 1 / 32
            api[nid] = {"class_type": "UltraResTestTinyFluxLoader", "inputs": {"seed": 0}}
    loader = next(nid for nid, n in api.items() if n["class_type"] in ("UltraResToyWorldLoader", "UltraResTestTinyFluxLoader")
                  or n["class_type"] == "UltraResTestTinyCascadeLoader" and n["inputs"]["stage"] == "c")
    for nid, node in list(api.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CLIPTextEncode":
            redirect(api, [nid, 0], [loader, 1 if "Positive" in node["_meta"]["title"] else 2])
            del api[nid]
        elif kind == "DualCLIPLoader":
            del api[nid]
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage", "StableCascade_EmptyLatentImage", "UltraResUltraPixelLRPass"):
            inputs["width"], inputs["height"] = int(inputs["width"] * factor), int(inputs["height"] * factor)
            if "steps" in inputs:  # the UltraPixel LR pass samples too
                inputs["steps"] = TEST_STEPS
        elif kind == "KSampler":
            inputs["steps"] = TEST_STEPS
        elif kind == "UltraResRedilateModel":  # the toy world is SD1.x with 3 levels: no reference preset fits it
            inputs["preset"] = "auto (from latent size)"
    if any(n["class_type"] == "UltraResPASDUNetLoader" for n in api.values()):
        factor = 1 / 16  # PASD: 4096 -> 256 px, the toy's native size (full PACA attends over every latent px)
    for node in api.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "ImageScale":
            inputs["width"], inputs["height"] = int(inputs["width"] * factor), int(inputs["height"] * factor)
        elif kind == "UltraResPASDTiledSampling":
            inputs["tile_size"] = int(inputs["tile_size"] * factor)  # 512 > 320 latent px at 4K: the tiled path here too
    return api, factor


def final_size(api: dict) -> tuple[int, int]:
    size = next(n["inputs"] for n in api.values() if n.get("_meta", {}).get("title") == "Size")
    return size["width"], size["height"]


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_end_to_end_with_tiny_models(name, server, tmp_path):
    original = api_workflow(name)
    api, factor = with_tiny_models(original)
    width, height = final_size(original)
    result = client.run_workflow(api, server.url, out_dir=tmp_path, on_event=None)
    saves = [nid for nid, n in api.items() if n["class_type"] == "SaveImage"]
    assert len(result["files"]) == len(saves), result["outputs"]
    for path in result["files"]:
        assert path.is_file() and path.parent.name == "UltraRes"
        with Image.open(path) as img:
            assert img.size == (int(width * factor), int(height * factor)), (path.name, img.size)
            assert img.width * height == img.height * width  # the workflow's aspect
            assert np.asarray(img).std() > 0, f"{path.name} is a flat image"


# ---- the headless client ---------------------------------------------------------------------

def toy(size=256, steps=2):
    """The toy demo at native size, few steps, through the client's own override syntax."""
    return [f"Size.width={size}", f"Size.height={size}", f"*.steps={steps}"]


def test_client_command_line_downloads_the_outputs(server, tmp_path):
    cmd = [sys.executable, str(host.REPO / "client.py"), str(WORKFLOWS / "api" / "toy_world_4x_compare.json"),
           "--server", server.url, "--out", str(tmp_path), *[a for s in toy() for a in ("--set", s)], "--set", "*.seed=5",
           "--set", "Toy world.shape=triangle"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    files = sorted(p for p in tmp_path.rglob("*.png"))
    assert [p.name.rsplit("_", 2)[0] for p in files] == ["toy_cutdiffusion", "toy_direct", "toy_lr_guided", "toy_redilate"]
    assert sorted(res.stdout.split()) == [str(p) for p in files]  # the command prints what it wrote
    assert "Sampler (direct)" in res.stderr and "done" in res.stderr  # progress by node title
    with Image.open(files[0]) as img:
        assert img.size == (256, 256)


def test_client_reports_validation_errors_by_node_and_input(server, tmp_path):
    with pytest.raises(client.ValidationFailed) as err:
        client.run_workflow(WORKFLOWS / "api" / "toy_world_4x_compare.json", server.url,
                            overrides=["Sampler (direct).steps=0", "Sampler (CutDiffusion).sampler_name=nope"], on_event=None)
    message = str(err.value)
    api = api_workflow("toy_world_4x_compare")
    direct = next(nid for nid, n in api.items() if n["_meta"]["title"] == "Sampler (direct)")
    cut = next(nid for nid, n in api.items() if n["_meta"]["title"] == "Sampler (CutDiffusion)")
    assert f"node {direct} (KSampler, 'Sampler (direct)'): input 'steps': Value 0 smaller than min of 1" in message, message
    assert f"node {cut} (KSampler, 'Sampler (CutDiffusion)'): input 'sampler_name': Value not in list" in message, message
    assert not list(tmp_path.iterdir())


def test_client_reports_a_failed_run(server):
    """Pixel Interaction without Patch Split fails inside the run (execution_error)."""
    prompt = {"1": {"class_type": "UltraResToyWorldLoader", "inputs": {"shape": "disk"}},
              "2": {"class_type": "UltraResPixelInteraction", "inputs": {"model": ["1", 0], "seed": 0}},
              "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
              "4": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 0, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
                                                         "scheduler": "normal", "positive": ["1", 1], "negative": ["1", 2],
                                                         "latent_image": ["3", 0], "denoise": 1.0}},
              "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 3]}},
              "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "fail"}}}
    with pytest.raises(client.RunFailed, match=r"node 2 \(UltraResPixelInteraction\): UltraResInputError: Pixel Interaction: "
                                               r"input 'model': this model has no Patch Split/Reassemble applied"):
        client.run_workflow(prompt, server.url, on_event=None)


def test_client_reports_an_interrupted_run(server):
    events = []

    def interrupt_on_first_step(kind, data, prompt):
        events.append(kind)
        if kind == "progress" and "interrupted" not in events:
            events.append("interrupted")
            assert server.post("/interrupt", {})[0] == 200

    with pytest.raises(client.RunInterrupted, match="interrupted at node"):
        client.run_workflow(WORKFLOWS / "api" / "toy_world_4x_compare.json", server.url,
                            overrides=toy(size=512, steps=50), on_event=interrupt_on_first_step)
    assert events.count("progress") < 10, "the run went on after /interrupt"


def test_client_names_an_unreachable_server_and_bad_overrides(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert client.main([str(WORKFLOWS / "api" / "toy_world_4x_compare.json"), "--server", url]) == 2
    assert f"cannot reach ComfyUI at {url}" in capsys.readouterr().err
    prompt = api_workflow("toy_world_4x_compare")
    with pytest.raises(client.ClientError, match="no node titled 'Seed'; titles in this workflow: .*Sampler \\(direct\\)"):
        client.apply_overrides(prompt, ["Seed.seed=5"])
    with pytest.raises(client.ClientError, match="has no input 'sed'"):
        client.apply_overrides(prompt, ["Sampler (direct).sed=5"])
    with pytest.raises(client.ClientError, match="connected to node"):
        client.apply_overrides(prompt, ["Sampler (direct).model=1"])
    client.apply_overrides(prompt, ["*.seed=9", "Sampler (direct).cfg=3", "Toy world.shape=square"])
    assert {n["inputs"]["seed"] for n in prompt.values() if "seed" in n["inputs"]} == {9}
    assert [n["inputs"]["cfg"] for n in prompt.values() if n["_meta"]["title"] == "Sampler (direct)"] == [3.0]
