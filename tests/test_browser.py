"""The pack in ComfyUI's own page: the real server, its bundled frontend in headless Debian Chromium
(driven by Playwright, no browser download, loopback only). Every bundled UI workflow loads through
the app with no missing node and no node in error; the UltraRes extension shows its plan on the
pack's nodes; the toy workflow queued from the page shows its image. The extension's pure functions
are checked against the Python that really runs (patches/*.py)."""

import json
import os
import pathlib
import shutil
import types

import pytest
import torch

import host
import tiny_models
from ultrares.patches import cutdiffusion as cd
from ultrares.patches import pasd
from ultrares.patches import scalecrafter as sc
from ultrares.patches import ultrapixel as up
from ultrares.patches import urae
from ultrares.patches.exact_decode import plan as exact_decode_plan
from ultrares.patches.lr_guidance import global_stride

CHROMIUM = "/usr/bin/chromium"
# Off the network: no background services, updates or QUIC; a fresh profile per run (the context's folder).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOY = host.REPO / "tests" / "data" / "toy_cutdiffusion_ui.json"
# The bundled workflows (workflows/*.json, UI format) and the toy one of this test.
WORKFLOWS = sorted((host.REPO / "workflows").glob("*.json")) + [TOY]
MATH = "/extensions/ultrares/js/ultrares_math.js"
INFO_NODES = {"UltraResPatchSplit", "UltraResPixelInteraction", "UltraResRedilateModel", "UltraResNoiseDampedCFG",
              "UltraResLRConditionInjector", "UltraResURAEFlux", "UltraResExactVAEDecode", "UltraResUltraPixelLRPass"}


def require_browser():
    """The project's set-up installs Playwright and Chromium, so there a missing one is a failure;
    against a user's own ComfyUI (COMFYUI_DIR) the test is skipped instead."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright (tests/requirements-test.txt)")
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (Debian's chromium, tests/setup_browser.sh)")
    if missing:
        message = "the browser test needs " + " and ".join(missing)
        if host.COMFYUI_DIR == (host.REPO / ".comfyui").resolve():
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser(comfy_server, tmp_path_factory):
    """(page, errors): ComfyUI's page, loaded, with the UltraRes extension registered."""
    require_browser()
    from playwright.sync_api import sync_playwright

    # A first visit would open the template browser over the canvas.
    comfy_server.post("/settings/Comfy.TutorialCompleted", True)
    comfy_server.post("/settings/Comfy.Minimap.Visible", False)
    errors = []
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1600, "height": 1000})
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(120_000)  # a busy 2-core machine takes long for the frontend
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.goto(comfy_server.url, wait_until="domcontentloaded")
        page.wait_for_function("() => window.app?.graph && app.extensions?.some(e => e.name === 'UltraRes.SizeInfo')",
                               timeout=300_000)
        yield types.SimpleNamespace(page=page, errors=errors, server=comfy_server)
        context.close()


def load(page, workflow: dict) -> dict:
    """Load a UI-format workflow with the app's own call; what a user would see right after: dialogs
    and toasts (the frontend's schema check reports a malformed workflow in a toast)."""
    return page.evaluate("""async (wf) => {
        const sleep = ms => new Promise(r => setTimeout(r, ms));
        document.querySelectorAll('.p-toast-close-button').forEach(b => b.click());
        for (let i = 0; i < 40 && document.querySelector('.p-toast-message'); i++) await sleep(50);
        const missing = wf.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types));
        await app.loadGraphData(wf);
        await sleep(300);  // dialogs and toasts open asynchronously
        app.canvas.draw(true, true);
        const dialogs = [...document.querySelectorAll('.p-dialog, .p-toast-message')].map(d => d.innerText);
        const info = Object.fromEntries(app.graph.nodes.filter(n => n.ultraresInfo).map(n => [n.id, n.ultraresInfo]));
        return {missing, dialogs, info, errors: app.graph.nodes.filter(n => n.has_errors).map(n => n.type),
                types: Object.fromEntries(app.graph.nodes.map(n => [n.id, n.type]))};
    }""", workflow)


def close_dialogs(page):
    page.keyboard.press("Escape")
    page.wait_for_function("() => !document.querySelector('.p-dialog')", timeout=5000)


def test_extension_is_served_and_loads_cleanly(browser):
    assert any("/extensions/ultrares/js/ultrares.js" in e for e in browser.server.get("/extensions"))
    ours = [e for e in browser.errors if "ultrares" in e.lower()]
    assert not ours, ours


def test_missing_node_dialog_is_detected(browser):
    """Control for the workflow test: a workflow with an unknown node type does show the dialog."""
    workflow = json.loads(TOY.read_text())
    workflow["nodes"][0]["type"] = "UltraResNoSuchNode"
    seen = load(browser.page, workflow)
    assert seen["missing"] == ["UltraResNoSuchNode"]
    assert any("UltraResNoSuchNode" in d for d in seen["dialogs"]), seen["dialogs"]
    close_dialogs(browser.page)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_bundled_workflow_loads_without_missing_or_failing_nodes(browser, path):
    workflow = json.loads(path.read_text())
    seen = load(browser.page, workflow)
    assert not seen["missing"], f"node types unknown to the frontend: {seen['missing']}"
    assert not seen["dialogs"], f"dialog after loading {path.name}: {seen['dialogs']}"
    assert not seen["errors"], f"nodes in error: {seen['errors']}"
    # The page turns it into an API prompt of node classes the server has.
    classes = browser.page.evaluate("async () => Object.values((await app.graphToPrompt()).output).map(n => n.class_type)")
    assert classes and set(classes) <= browser.server.get("/object_info").keys()
    for node_id, node_type in seen["types"].items():
        if node_type in INFO_NODES:
            info = seen["info"].get(node_id)
            assert info and info["lines"] and "error" not in info, (node_type, info)


def test_info_panel_shows_the_plan_for_the_connected_size(browser):
    """The toy workflow samples 768x512 px (96x64 latent px) at native 32 latent px."""
    page = browser.page
    drawn = page.evaluate("""async (wf) => {
        await app.loadGraphData(wf);
        const texts = [], fill = CanvasRenderingContext2D.prototype.fillText;
        CanvasRenderingContext2D.prototype.fillText = function (t, ...rest) { texts.push(String(t)); return fill.call(this, t, ...rest); };
        try { app.canvas.draw(true, true); } finally { CanvasRenderingContext2D.prototype.fillText = fill; }
        return texts;
    }""", json.loads(TOY.read_text()))
    info = {n["type"]: n["info"] for n in page.evaluate(
        "() => app.graph.nodes.filter(n => n.ultraresInfo).map(n => ({type: n.type, info: n.ultraresInfo}))")}
    split, redilate = info["UltraResPatchSplit"]["data"], info["UltraResRedilateModel"]["data"]
    assert split["size"] == [64, 96] and split["patch"] == 32
    assert split["grid1"] == [2, 3] and split["stage1"] == 6  # 96/32 x 64/32 sub-lattices
    assert split["grid2"] == [3, 5] and split["stage2"] == 15  # 32-px windows every 16 px
    assert redilate["ratio"] == 3 and redilate["perLevel"] == [1, 2, 3, 3] and redilate["progressive"]
    assert "shuffles across the 6 stage-1 patches of 768x512 px" in info["UltraResPixelInteraction"]["lines"]
    # What the node holds is what the canvas draws.
    for lines in (i["lines"] for i in info.values()):
        assert set(lines) <= set(drawn), (lines, drawn[-20:])


def test_size_preset_menu_sets_multiples_and_the_plan_follows(browser):
    page = browser.page
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", json.loads(TOY.read_text()))
    menu = page.evaluate("""() => {
        const latent = app.graph.nodes.find(n => n.type === 'EmptyLatentImage');
        const entry = app.collectNodeMenuItems(latent).find(i => i?.content?.startsWith('UltraRes size'));
        return entry && {title: entry.content, options: entry.submenu.options.map(o => o.content)};
    }""")
    assert menu and menu["title"] == "UltraRes size (multiples of 64 px)"
    assert "2048 x 2048" in menu["options"] and "3840 x 2176" in menu["options"]  # 2160 is no multiple of 64
    split = page.evaluate("""() => {
        const latent = app.graph.nodes.find(n => n.type === 'EmptyLatentImage');
        const entry = app.collectNodeMenuItems(latent).find(i => i?.content?.startsWith('UltraRes size'));
        entry.submenu.options.find(o => o.content === '4096 x 2048').callback();
        app.canvas.draw(true, true);
        return {widgets: [latent.widgets[0].value, latent.widgets[1].value],
                info: app.graph.nodes.find(n => n.type === 'UltraResPatchSplit').ultraresInfo.data};
    }""")
    assert split["widgets"] == [4096, 2048]
    assert split["info"]["size"] == [256, 512] and split["info"]["stage1"] == 8 * 16


def test_pure_functions_match_the_python(browser):
    sizes = [(64, 32), (96, 32), (100, 32), (128, 64), (200, 64), (512, 128), (33, 32), (31, 32)]
    splits = [(64, 96, 32, 0.5), (100, 77, 32, 0.25), (512, 256, 128, 0.5), (30, 40, 32, 0.875), (128, 128, 64, 0.0)]
    ratios = [(3, 1.0), (3, 1.5), (3, 2.0), (3, 3.0), (4, 2.5), (4, 4.0), (4, 6.0), (3, 8.0)]
    decays = [(4.0, 0.0), (4.0, 0.5), (4.0, 0.9), (3.0, 0.34), (2.5, 0.7)]
    tokens = [4608, 16384 + 512, 65536 + 512, 1000]
    pasd_tiles = [(512, 320, 8), (320, 320, 8), (700, 320, 8), (32, 20, 8), (64, 16, 0)]
    strides = [((128, 128), (64, 64), 0), ((256, 128), (64, 64), 0), ((96, 96), (64, 64), 0), ((100, 60), (40, 40), 0),
               ((128, 128), (64, 64), 3)]
    pictures = [(4096, 4096), (2560, 5120), (5120, 2560), (2304, 4096), (3072, 3072), (1536, 1536), (1000, 3000)]
    js = browser.page.evaluate("""async ([url, c]) => {
        const M = await import(url);
        return {
          lattice: c.sizes.map(([s, p]) => M.lattice(s, p)),
          splits: c.splits.map(([h, w, p, o]) => M.patchSplitPlan(h, w, p, o)),
          levels: c.ratios.map(([l, r]) => M.autoLevels(l, r)),
          milder: c.ratios.map(([l, r]) => M.milderLevels(M.autoLevels(l, r))),
          unchanged: c.ratios.map(([l, r]) => M.redilatePlan(16 * r, 16, l).passthrough),
          decays: c.decays.map(([d, done]) => M.progressiveDilation(d, done)),
          scales: c.tokens.map(t => M.proportionalAttentionScale(t)),
          strides: c.strides.map(([h, l, g]) => M.lrGlobalStride(h, l, g)),
          rounds: [0.5, 1.5, 2.5, -0.5, 2.4, 2.6].map(M.pyRound),
          pasdTiles: c.pasd.map(([n, t, o]) => M.pasdTileOrigins(n, t, o)),
          presets: {16: M.presetsFor(16), 64: M.presetsFor(64)}, targets: M.SIZE_PRESETS,
          cascade: c.pictures.map(([h, w]) => [M.cascadeLatent(h, w), M.ultrapixelLrPixels(h, w),
                                               M.ultrapixelTier(M.cascadeLatent(h, w)[0] * M.cascadeLatent(h, w)[1])]),
        };
    }""", [MATH, dict(sizes=sizes, splits=splits, ratios=ratios, decays=decays, tokens=tokens, strides=strides, pasd=pasd_tiles, pictures=pictures)])

    assert [(r["stride"], r["padded"]) for r in js["lattice"]] == [cd.lattice(s, p) for s, p in sizes]
    for (h, w, p, o), plan in zip(splits, js["splits"]):
        layout = cd.windows(h, w, p, o, jitter=False, generator=torch.Generator())
        assert plan["stage1"] == cd.lattice(h, p)[0] * cd.lattice(w, p)[0]
        assert plan["stage2"] == len(layout.corners) and plan["window"] == list(layout.size)

    def per_level(table, levels):
        return [1.0] + [table.get(f"in{level}", 1.0) for level in range(1, levels)] + [table.get("mid", 1.0)]

    for (levels, ratio), got, milder in zip(ratios, js["levels"], js["milder"]):
        table = sc.auto_table(levels, ratio)
        for level in range(1, levels):  # one factor per level: every slot kind of a level agrees
            assert len({table.get(f"{k}{level}") for k in ("in", "down", "out", "up")}) == 1
        assert got == per_level(table, levels), (levels, ratio)
        assert milder == per_level(sc.milder_table(table, levels), levels), (levels, ratio)
    assert js["unchanged"] == [not sc.auto_table(levels, ratio) for levels, ratio in ratios]
    assert js["decays"] == [sc.progressive_dilation(d, done) for d, done in decays]
    assert js["scales"] == pytest.approx([urae.proportional_attention_scale(t) for t in tokens], rel=1e-12)
    for (high, low, stride), got in zip(strides, js["strides"]):
        assert got == global_stride(high, low, stride), (high, low, stride)
    assert js["rounds"] == [round(x) for x in (0.5, 1.5, 2.5, -0.5, 2.4, 2.6)]
    assert js["pasdTiles"] == [pasd.tile_origins(n, t, o) for n, t, o in pasd_tiles]
    for (h, w), (hr, lr_px, tier) in zip(pictures, js["cascade"]):
        assert (tuple(hr), tuple(lr_px)) == (up.hr_latent_size(h, w), up.lr_pixel_size(h, w)), (h, w)
        assert tier == up.tier_weight(hr[0] * hr[1])
    for multiple, presets in js["presets"].items():
        for (w, h), (tw, th) in zip(presets, js["targets"]):
            assert w % int(multiple) == 0 and h % int(multiple) == 0
            assert abs(w - tw) <= int(multiple) / 2 and abs(h - th) <= int(multiple) / 2


def test_exact_decode_memory_matches_the_planner(browser):
    """The info panel's RAM / GPU figures are the planner's for the SD/SDXL/FLUX decoder in bf16, and the
    node shows them for the latent it decodes (the toy workflow's 768x512 px, tile 512)."""
    cases = [(512, 512, 512), (768, 512, 512), (1024, 1024, 256), (2048, 2048, 512), (4096, 4096, 512),
             (2048, 4096, 1024), (8192, 8192, 512), (4096, 2176, 64)]
    js = browser.page.evaluate("""async ([url, c]) => {
        const M = await import(url);
        return c.map(([h, w, t]) => M.exactDecodeMemory(h, w, t));
    }""", [MATH, cases])
    decoder = tiny_models.released_vae("flux").first_stage_model.decoder.to("meta")
    for (h, w, tile), got in zip(cases, js):
        planned = exact_decode_plan(decoder, (1, 16, h // 8, w // 8), tile, torch.bfloat16)
        assert (got["stateBytes"], got["tileBytes"]) == (planned.state_bytes, planned.tile_bytes), (h, w, tile)
    shown = browser.page.evaluate("""async (wf) => {
        await app.loadGraphData(wf);
        const decode = LiteGraph.createNode('UltraResExactVAEDecode');
        app.graph.add(decode);
        app.graph.nodes.find(n => n.type === 'KSampler').connect(0, decode, 0);
        decode.widgets.find(w => w.name === 'layer_memory').value = 'cpu';
        app.canvas.draw(true, true);
        return decode.ultraresInfo;
    }""", json.loads(TOY.read_text()))
    planned = exact_decode_plan(decoder, (1, 16, 64, 96), 512, torch.bfloat16)
    assert shown["data"]["memory"] == {"stateBytes": planned.state_bytes, "tileBytes": planned.tile_bytes}
    assert shown["lines"][1] == (f"bf16: layers {planned.state_bytes / 2 ** 30:.1f} GiB in RAM; "
                                 f"tiles at most {planned.tile_bytes / 2 ** 30:.1f} GiB on the GPU + weights"), shown


def test_queued_toy_workflow_shows_its_image(browser, tmp_path):
    """Queue from the page (the Run button's own call) and wait for the preview image on the canvas."""
    page = browser.page
    seen = load(page, json.loads(TOY.read_text()))
    assert not seen["missing"] and not seen["dialogs"]
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    try:
        page.wait_for_function("""() => {
            const preview = app.graph.nodes.find(n => n.type === 'PreviewImage');
            return preview?.imgs?.[0]?.complete && preview.imgs[0].naturalWidth > 0;
        }""", timeout=120_000)
    finally:  # the screenshot is the test's artifact, kept on failure too
        screenshot(page, tmp_path / "toy_workflow.png")
    image = page.evaluate("""() => {
        const img = app.graph.nodes.find(n => n.type === 'PreviewImage').imgs[0];
        const canvas = Object.assign(document.createElement('canvas'), {width: img.naturalWidth, height: img.naturalHeight});
        const ctx = canvas.getContext('2d');
        ctx.drawImage(img, 0, 0);
        const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        let lo = 255, hi = 0;
        for (let i = 0; i < px.length; i++) if (i % 4 !== 3) { lo = Math.min(lo, px[i]); hi = Math.max(hi, px[i]); }
        return {width: img.naturalWidth, height: img.naturalHeight, src: img.src, range: hi - lo,
                nodeErrors: Object.keys(app.lastNodeErrors ?? {})};
    }""")
    assert (image["width"], image["height"]) == (768, 512), image
    assert "/view?" in image["src"] and image["range"] > 0, image  # a real picture, not a blank one
    assert not image["nodeErrors"]


def screenshot(page, path: pathlib.Path):
    """The whole graph in view; copied to $ULTRARES_ARTIFACTS when that is set."""
    page.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.wait_for_timeout(500)
    page.screenshot(path=str(path))
    if os.environ.get("ULTRARES_ARTIFACTS"):
        out = pathlib.Path(os.environ["ULTRARES_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)
