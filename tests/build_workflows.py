"""Writes the bundled workflows: workflows/<name>.json (UI format, as the frontend saves it),
workflows/<name>.jpg (the template browser's thumbnail: a drawing of the graph) and
workflows/api/<name>.json (API format, converted from the UI file by client.ui_to_api).

    .venv/bin/python tests/build_workflows.py      # starts a headless host for /object_info

Each graph is written once below, with widgets by name; their order, the defaults of widgets not
named, the sockets and the control-after-generate values come from the live host's /object_info,
so the files match what the frontend itself would save.
"""

import json
import pathlib
import sys
import tempfile
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from host import REPO  # noqa: E402  (the real host in this process: the pack is importable)
from ultrares.nodes import toy_world  # noqa: E402
from ultrares.patches import ultrapixel  # noqa: E402

WORKFLOWS = REPO / "workflows"

# The model files the workflows name (what users download); the tests put stand-ins under these names.
SDXL_CKPT = "sd_xl_base_1.0.safetensors"
SD15_CKPT = "v1-5-pruned-emaonly.safetensors"
FLUX_UNET = "flux1-dev.safetensors"
CLIP_L, T5XXL = "clip_l.safetensors", "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"
URAE_2K, URAE_4K = "urae_2k_adapter.safetensors", "urae_4k_adapter.safetensors"
PASD_UNET, PASD_CONTROLNET = "pasd_unet.safetensors", "pasd_controlnet.safetensors"  # PASD's unet/ and controlnet/ files, renamed
PASD_INPUT = "pasd_input.png"  # the picture to upscale (the user's own, in ComfyUI's input folder)
CASCADE_C, CASCADE_B = "stable_cascade_stage_c.safetensors", "stable_cascade_stage_b.safetensors"
ULTRAPIXEL = "ultrapixel_t2i.safetensors"
MODEL_FILES = {"checkpoints": [SDXL_CKPT, SD15_CKPT, CASCADE_C, CASCADE_B], "diffusion_models": [FLUX_UNET, PASD_UNET, ULTRAPIXEL],
               "text_encoders": [CLIP_L, T5XXL], "vae": [FLUX_VAE], "loras": [URAE_2K, URAE_4K], "controlnet": [PASD_CONTROLNET]}

NEGATIVE = "blurry, ugly, duplicate, poorly drawn, deformed, mosaic"  # CutDiffusion's default negative prompt
PROMPT = "a lighthouse on a rocky coast at dawn, waves, gulls, highly detailed photograph"
EXACT_DECODE_TIP = ("Decode: VAE Decode (Tiled), which fits any GPU. For a seam-free image replace it with UltraRes "
                    "Exact Tiled VAE Decode; its layer tensors need about 2.6 GB of RAM or VRAM per megapixel (~44 GB at "
                    "4096x4096, from its help page).")


class Node:
    def __init__(self, graph, id, kind, title, values):
        self.graph, self.id, self.kind, self.title, self.values = graph, id, kind, title, values


class Graph:
    """A workflow under construction: add(kind, title, name=value or name=(node, output slot))."""

    def __init__(self, info: dict):
        self.info, self.nodes = info, []

    def add(self, kind, title=None, **values) -> Node:
        node = Node(self, len(self.nodes) + 1, kind, title, values)
        self.nodes.append(node)
        return node

    def ui(self, note: str) -> dict:
        from ultrares.client import has_control_widget, is_widget

        links, ui_nodes = [], {}
        for node in self.nodes:
            spec = self.info[node.kind]
            inputs, widgets = [], []
            for section in ("required", "optional"):
                for name, s in spec["input"].get(section, {}).items():
                    value = node.values.get(name)
                    if is_widget(s):
                        widgets.append(value if name in node.values else s[1].get("default", _first_option(s)))
                        if has_control_widget(name, s):
                            widgets.append("fixed")  # reproducible; the UI offers randomize
                        continue
                    link = None
                    if value is not None:
                        src, slot = value
                        link = len(links) + 1
                        links.append([link, src.id, slot, node.id, len(inputs), s[0]])
                    inputs.append({"name": name, "type": s[0], "link": link})
            unknown = set(node.values) - {n for sec in spec["input"].values() for n in sec}
            assert not unknown, f"{node.kind} has no inputs {unknown}"
            outputs = [{"name": name, "type": t, "links": [], "slot_index": i}
                       for i, (t, name) in enumerate(zip(spec["output"], spec["output_name"]))]
            ui_nodes[node.id] = {"id": node.id, "type": node.kind, "pos": [0, 0], "size": [0, 0], "flags": {}, "order": 0,
                                 "mode": 0, "inputs": inputs, "outputs": outputs,
                                 "properties": {"Node name for S&R": node.kind}, "widgets_values": widgets}
            if node.title:
                ui_nodes[node.id]["title"] = node.title
        for link_id, src, slot, *_ in links:
            ui_nodes[src]["outputs"][slot]["links"].append(link_id)
        note_id = len(self.nodes) + 1
        ui_nodes[note_id] = {"id": note_id, "type": "Note", "pos": [0, 0], "size": [420, 0], "flags": {}, "order": 0, "mode": 0,
                             "inputs": [], "outputs": [], "title": "Read me", "properties": {}, "widgets_values": [note],
                             "color": "#432", "bgcolor": "#653"}
        _layout(ui_nodes, links, note_id)
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, note)), "revision": 0, "last_node_id": note_id,
                "last_link_id": len(links), "nodes": list(ui_nodes.values()), "links": links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.65, "offset": [40, 40]}}, "version": 0.4}


def _first_option(spec):
    from ultrares.client import _options

    options = _options(spec)
    return options[0] if options else None


def _layout(nodes: dict, links: list, note_id: int) -> None:
    """Columns by longest path from a source, stacked top to bottom; the Note heads column 0."""
    parents = {}
    for _, src, _, dst, *_ in links:
        parents.setdefault(dst, []).append(src)
    depth = {}

    def column(nid):
        if nid not in depth:
            depth[nid] = 1 + max((column(p) for p in parents.get(nid, [])), default=-1)
        return depth[nid]

    order = sorted((n for n in nodes if n != note_id), key=lambda n: (column(n), n))
    for i, nid in enumerate([note_id] + order):
        nodes[nid]["order"] = i
    y = {}
    for nid in [note_id] + order:
        node = nodes[nid]
        col = 0 if nid == note_id else column(nid)
        widgets = len(node["widgets_values"])
        text = sum(isinstance(v, str) and len(v) > 40 for v in node["widgets_values"])
        height = node["size"][1] or 40 + 22 * max(len(node["inputs"]), len(node["outputs"])) + 26 * widgets + 90 * text
        if nid == note_id:
            height = 60 + 17 * (len(node["widgets_values"][0]) // 52 + node["widgets_values"][0].count("\n"))
        node["size"] = [node["size"][0] or 330, height]
        node["pos"] = [40 + col * 380 + (90 if col else 0), y.get(col, 40)]
        y[col] = node["pos"][1] + height + 50


# ---- the graphs ----------------------------------------------------------------------------------

def sdxl_text(g, ckpt, positive=PROMPT, negative=NEGATIVE):
    pos = g.add("CLIPTextEncode", "Positive prompt", text=positive, clip=(ckpt, 1))
    neg = g.add("CLIPTextEncode", "Negative prompt", text=negative, clip=(ckpt, 1))
    return pos, neg


def decode_save(g, latent, vae, prefix, tiled=True):
    image = (g.add("VAEDecodeTiled", "Decode (tiled)", samples=(latent, 0), vae=vae, tile_size=512, overlap=64)
             if tiled else g.add("VAEDecode", samples=(latent, 0), vae=vae))
    return g.add("SaveImage", filename_prefix=prefix, images=(image, 0))


def sampler(g, model, pos, neg, latent, title="Sampler", **settings):
    return g.add("KSampler", title, model=(model, 0), positive=(pos, 0), negative=(neg, 0), latent_image=(latent, 0),
                 seed=0, denoise=1.0, **settings)


# Reference sampling (ScaleCrafter: DDIM eta=1, 50 steps on the leading-spaced schedule t = 981 - 20i;
# ddim_uniform reproduces that schedule, euler_ancestral is eta=1 ancestral sampling).
SCALECRAFTER_SAMPLING = dict(sampler_name="euler_ancestral", scheduler="ddim_uniform", steps=50)
# CutDiffusion / DemoFusion: diffusers' Euler on the same leading-spaced schedule, 50 steps, CFG 7.5.
EULER_SAMPLING = dict(sampler_name="euler", scheduler="ddim_uniform", steps=50, cfg=7.5)


def redilate_chain(g, model, preset):
    """Re-dilate Model (reference schedule) + Noise-Damped CFG over the same 70%."""
    redilated = g.add("UltraResRedilateModel", preset=preset, model=(model, 0))
    return g.add("UltraResNoiseDampedCFG", model=(redilated, 0))


def sdxl_4096_redilate_ndcfg(g):
    """SDXL 4096x4096: Re-dilate Model + Noise-Damped CFG + FreeU"""
    ckpt = g.add("CheckpointLoaderSimple", "Checkpoint", ckpt_name=SDXL_CKPT)
    freeu = g.add("FreeU", model=(ckpt, 0), b1=1.1, b2=1.2, s1=0.6, s2=0.4)
    model = redilate_chain(g, freeu, "SDXL 4096x4096")
    pos, neg = sdxl_text(g, ckpt)
    size = g.add("EmptyLatentImage", "Size", width=4096, height=4096, batch_size=1)
    decode_save(g, sampler(g, model, pos, neg, size, cfg=5.0, **SCALECRAFTER_SAMPLING), (ckpt, 2), "UltraRes/sdxl_4096_redilate")
    return (f"SDXL 4096x4096: ScaleCrafter (Re-dilate Model + Noise-Damped CFG) with FreeU.\n\n"
            f"Needs: models/checkpoints/{SDXL_CKPT} (SDXL 1.0 base), nothing else.\n"
            "Reference settings (ScaleCrafter text2image_xl.py): 50 steps of DDIM eta=1 on its leading-spaced schedule "
            "(here euler_ancestral + ddim_uniform), CFG 5, FreeU b1 1.1 b2 1.2 s1 0.6 s2 0.4, dilation preset "
            "'SDXL 4096x4096' for the first 70% of the steps, noise-damped guidance over the same range.\n"
            "VRAM: estimated 12 GB (SDXL fp16 weights 5 GB + 4096x4096 activations; not measured).\n"
            "Time: estimated 15-30 min on an RTX 4090 (each step is ~2.7 UNet passes over 16x the native pixels).\n"
            f"{EXACT_DECODE_TIP}")


# CutDiffusion's stage-1 sub-lattices cost one base evaluation per patch, its stage-2 windows (half-window
# stride) about 3x as many: switching at 0.75 of the steps instead of the reference's 0.5 keeps the chain
# within 1.5x the physical limit at 4096 (docs/cost.md), and a late switch is the setting that passed at
# 4x on the toy world (README).
CUTDIFFUSION_SWITCH = 0.75
# LR-guided: windows at a quarter overlap (stride 96 latent px: 25 windows at 4096 instead of 49), so the
# three passes cost under half of DemoFusion's schedule at the same size (docs/cost.md).
LR_WINDOW_OVERLAP = 0.25


def cutdiffusion(g, width, height, name):
    ckpt = g.add("CheckpointLoaderSimple", "Checkpoint", ckpt_name=SDXL_CKPT)
    split = g.add("UltraResPatchSplit", model=(ckpt, 0), switch_at=CUTDIFFUSION_SWITCH)
    shuffle = g.add("UltraResPixelInteraction", model=(split, 0))
    pos, neg = sdxl_text(g, ckpt)
    size = g.add("EmptyLatentImage", "Size", width=width, height=height, batch_size=1)
    decode_save(g, sampler(g, shuffle, pos, neg, size, **EULER_SAMPLING), (ckpt, 2), f"UltraRes/{name}")
    windows = (2 * width // 1024 - 1) * (2 * height // 1024 - 1)
    patches = width * height // 1024 ** 2
    stage1 = round(CUTDIFFUSION_SWITCH * 50)
    return (f"SDXL {width}x{height}: CutDiffusion (Patch Split/Reassemble + Pixel Interaction).\n\n"
            f"Needs: models/checkpoints/{SDXL_CKPT} (SDXL 1.0 base), nothing else.\n"
            "Settings (CutDiffusion cutdiffusion.py + README): Euler, 50 steps on the leading-spaced schedule "
            f"(ddim_uniform), CFG 7.5; the first {stage1} steps (the reference: 25): the image's strided sub-lattices as native "
            "1024x1024 patches with pixel interaction; then 1024x1024 windows at half-window stride with +-16 latent px "
            "jitter. The later switch keeps the cost within 1.5x of 16 base evaluations per step (docs/cost.md).\n"
            f"The model only ever sees 1024x1024 inputs: {patches} patches, then {windows} windows per step (x2 for CFG).\n"
            f"VRAM: estimated 8-12 GB (weights 5 GB; Patch Split batches as many patches as free memory allows, "
            "max_batch caps it; not measured).\n"
            f"Time: estimated {max(2, patches * 9 // 16)}-{max(4, patches * 18 // 16)} min on an RTX 4090 "
            f"({2 * (patches * stage1 + windows * (50 - stage1))} UNet evaluations at 1024x1024).\n{EXACT_DECODE_TIP}")


def sdxl_4096_cutdiffusion(g):
    """SDXL 4096x4096: CutDiffusion (Patch Split + Pixel Interaction)"""
    return cutdiffusion(g, 4096, 4096, "sdxl_4096_cutdiffusion")


def sdxl_2048x4096_cutdiffusion(g):
    """SDXL 2048x4096 (1:2): CutDiffusion"""
    return cutdiffusion(g, 2048, 4096, "sdxl_2048x4096_cutdiffusion")


def sdxl_4096_lr_guided(g):
    """SDXL 4096x4096: LR-guided 1024 -> 2048 -> 4096 (DemoFusion)"""
    ckpt = g.add("CheckpointLoaderSimple", "Checkpoint", ckpt_name=SDXL_CKPT)
    pos, neg = sdxl_text(g, ckpt)
    base_size = g.add("EmptyLatentImage", "Size (base 1024)", width=1024, height=1024, batch_size=1)
    base = sampler(g, ckpt, pos, neg, base_size, "Sampler (base 1024)", **EULER_SAMPLING)
    # DemoFusion's local path is MultiDiffusion = Patch Split's window stage alone (switch_at 0).
    windows = g.add("UltraResPatchSplit", "MultiDiffusion windows", model=(ckpt, 0), switch_at=0.0, window_overlap=LR_WINDOW_OVERLAP)
    latent, stride = base, 0
    for scale, title in ((2, "2x"), (4, "Size")):
        guided = g.add("UltraResLRConditionInjector", f"LR guidance ({scale}x)", model=(windows, 0), low_res_latent=(latent, 0),
                       global_strength=1.0, global_stride=stride)
        size = g.add("EmptyLatentImage", title if scale == 4 else f"Size ({title})", width=1024 * scale, height=1024 * scale, batch_size=1)
        latent = sampler(g, guided, pos, neg, size, f"Sampler ({1024 * scale})", **EULER_SAMPLING)
        stride = 4  # the 4x pass: sub-lattices of 1/4 = native size
    decode_save(g, latent, (ckpt, 2), "UltraRes/sdxl_4096_lr_guided")
    return (f"SDXL 4096x4096, LR-guided in DemoFusion's phases: 1024 -> 2048 -> 4096.\n\n"
            f"Needs: models/checkpoints/{SDXL_CKPT} (SDXL 1.0 base), nothing else.\n"
            "Each pass is guided by the previous result (LR Condition Injector: skip residual c1 = cf^3, dilated global "
            "path c2 = cf^1 with blur sigma 0.8, as DemoFusion's defaults) and samples through 1024x1024 MultiDiffusion "
            "windows (Patch Split with switch_at 0) at a quarter overlap (DemoFusion: half; this halves the cost, docs/cost.md). "
            "Euler, 50 steps (ddim_uniform = the leading-spaced schedule), CFG 7.5. "
            "The 4096 pass uses global_stride 4 so the global sub-lattices are native size.\n"
            "VRAM: estimated 8-12 GB (weights 5 GB, 1024x1024 model passes; not measured).\n"
            "Time: estimated 15-30 min on an RTX 4090 (about 5,500 UNet evaluations at 1024x1024 over the three passes).\n"
            f"{EXACT_DECODE_TIP}")


def sd15_2048_scalecrafter(g):
    """SD1.5 2048x2048: ScaleCrafter + FreeU"""
    ckpt = g.add("CheckpointLoaderSimple", "Checkpoint", ckpt_name=SD15_CKPT)
    freeu = g.add("FreeU", model=(ckpt, 0), b1=1.2, b2=1.4, s1=0.9, s2=0.2)
    model = redilate_chain(g, freeu, "SD1.5 2048x2048 / 2048x1024")
    pos, neg = sdxl_text(g, ckpt, negative="blurry, ugly, duplicate, poorly drawn, deformed")
    size = g.add("EmptyLatentImage", "Size", width=2048, height=2048, batch_size=1)
    decode_save(g, sampler(g, model, pos, neg, size, cfg=7.5, **SCALECRAFTER_SAMPLING), (ckpt, 2), "UltraRes/sd15_2048_scalecrafter")
    return ("SD1.5 2048x2048 (4x the side of its native 512x512): ScaleCrafter with FreeU.\n\n"
            f"Needs: models/checkpoints/{SD15_CKPT} (Stable Diffusion 1.5), nothing else.\n"
            "Reference settings (ScaleCrafter text2image.py, sd1.5_2048x2048 config): 50 steps of DDIM eta=1 on the "
            "leading-spaced schedule (euler_ancestral + ddim_uniform), CFG 7.5, FreeU b1 1.2 b2 1.4 s1 0.9 s2 0.2, the "
            "preset's progressive dilations 2/3/4 by level for the first 70% of the steps, noise-damped guidance with the "
            "preset's milder table.\n"
            "VRAM: estimated 6 GB (SD1.5 fp16 weights 1.7 GB + 2048x2048 activations; not measured).\n"
            "Time: estimated 5-10 min on an RTX 4090.\n"
            "Decode: VAE Decode (Tiled). Exact Tiled VAE Decode gives a seam-free image with ~11 GB of RAM or VRAM here.")


def toy_world_4x_compare(g):
    """Toy world 4x: direct vs Re-dilate vs CutDiffusion vs LR-guided"""
    toy = g.add("UltraResToyWorldLoader", "Toy world", shape="disk")
    size = g.add("EmptyLatentImage", "Size", width=1024, height=1024, batch_size=1)
    settings = dict(toy_world.SAMPLING)
    pos, neg = (toy, 1), (toy, 2)

    def save(latent, prefix):
        image = g.add("VAEDecode", samples=latent, vae=(toy, 3))
        g.add("SaveImage", filename_prefix=f"UltraRes/toy_{prefix}", images=(image, 0))

    def ksampler(model, title, latent=size, **changes):
        return g.add("KSampler", title, model=(model, 0), positive=pos, negative=neg, latent_image=(latent, 0), seed=0,
                     denoise=1.0, **(settings | changes))

    def branch(model, title, prefix, **changes):
        save((ksampler(model, title, **changes), 0), prefix)

    branch(toy, "Sampler (direct)", "direct")
    # re-dilated through every step (custom schedule), deepest factor 4.5, easing as a cosine to 2: chosen on the
    # tuning seeds, reported on held-out ones (docs/repetition.md)
    branch(g.add("UltraResRedilateModel", model=(toy, 0), schedule="custom", end_percent=1.0, decay="cosine to 2",
                 dilation=4.5),
           "Sampler (re-dilated)", "redilate")
    # CutDiffusion at the guidance that passed at 4x on this model: CFG 6 (the reference samples at 7.5),
    # stage 2 from 0.75 of the steps (README)
    split = g.add("UltraResPatchSplit", model=(toy, 0), switch_at=0.75)
    branch(g.add("UltraResPixelInteraction", model=(split, 0)), "Sampler (CutDiffusion)", "cutdiffusion", cfg=6.0)
    # LR-guided: the native-size picture guides one 4x pass (slow-decay guidance, the global path slowest: alpha2 0.1,
    # chosen on the tuning seeds, reported on held-out ones in docs/repetition.md; exact LR-Guided Sampler)
    native = g.add("EmptyLatentImage", "Size (1x guide)", width=256, height=256, batch_size=1)
    guide = ksampler(toy, "Sampler (1x guide)", native)
    guided = g.add("UltraResLRConditionInjector", model=(toy, 0), low_res_latent=(guide, 0), alpha1=0.25, global_strength=1.0,
                   alpha2=0.1)
    select = g.add("KSamplerSelect", sampler_name=settings["sampler_name"])
    exact = g.add("UltraResLRGuidedSampler", sampler=(select, 0))
    sigmas = g.add("BasicScheduler", model=(guided, 0), scheduler=settings["scheduler"], steps=settings["steps"], denoise=1.0)
    k = g.add("SamplerCustom", "Sampler (LR-guided)", model=(guided, 0), add_noise=True, noise_seed=0, cfg=settings["cfg"],
              positive=pos, negative=neg, sampler=(exact, 0), sigmas=(sigmas, 0), latent_image=(size, 0))
    save((k, 0), "lr_guided")
    return ("Toy world at 4x: one disk asked for, 1024x1024 px (the toy model is trained at 256x256).\n\n"
            "Needs: nothing to download - the pack's own 1.4M-parameter model (nodes/toy_world.safetensors). Runs on a CPU.\n"
            "Four branches from the same seed: direct sampling (repeats the object); Re-dilate Model (auto table from a "
            "deepest factor of 4.5, active through every step, decaying as a cosine to 2); CutDiffusion (Patch Split + Pixel Interaction at the native size, "
            "stage 2 from 0.75 of the steps, CFG 6: at CFG 2 its stage 1 greys the picture); "
            "LR-guided (a 256x256 picture guides the 4x pass: LR Condition Injector with the dilated global path, "
            "alpha1 = 0.25, alpha2 = 0.1, through the LR-Guided Sampler). "
            "dpmpp_2m_sde, karras, 20 steps, CFG 2 (the toy world's measured settings). Change 'shape' to square or triangle.\n"
            "Outputs: output/UltraRes/toy_direct_*, toy_redilate_*, toy_cutdiffusion_*, toy_lr_guided_*.\n"
            "VRAM/RAM: under 1 GB. Time: about a minute on a laptop CPU (estimated), seconds on a GPU.")


def flux_4096_urae(g):
    """FLUX.1-dev 4096x4096: URAE 2K + 4K adapters"""
    unet = g.add("UNETLoader", "Diffusion model", unet_name=FLUX_UNET, weight_dtype="default")
    lora = g.add("LoraLoaderModelOnly", "URAE 2K adapter", model=(unet, 0), lora_name=URAE_2K, strength_model=1.0)
    adapter = g.add("UltraResURAE4KAdapterLoader", model=(lora, 0), adapter_name=URAE_4K)
    model = g.add("UltraResURAEFlux", model=(adapter, 0), preset="4K (4096x4096)")
    clip = g.add("DualCLIPLoader", "Text encoders", clip_name1=CLIP_L, clip_name2=T5XXL, type="flux")
    text = g.add("CLIPTextEncode", "Positive prompt", text=PROMPT, clip=(clip, 0))
    guided = g.add("FluxGuidance", conditioning=(text, 0), guidance=3.5)
    empty = g.add("ConditioningZeroOut", conditioning=(text, 0))
    size = g.add("EmptySD3LatentImage", "Size", width=4096, height=4096, batch_size=1)
    k = sampler(g, model, guided, empty, size, sampler_name="euler", scheduler="simple", steps=28, cfg=1.0)
    vae = g.add("VAELoader", "VAE", vae_name=FLUX_VAE)
    decode_save(g, k, (vae, 0), "UltraRes/flux_4096_urae")
    return ("FLUX.1-dev 4096x4096 with URAE (2K adapter + 4K minor-component adapter, NTK RoPE, proportional "
            "attention, shift 3).\n\n"
            f"Needs: models/diffusion_models/{FLUX_UNET}; models/text_encoders/{CLIP_L} and {T5XXL} (or the fp8 T5); "
            f"models/vae/{FLUX_VAE}; models/loras/{URAE_2K} and {URAE_4K} (Hugging Face Huage001/URAE). "
            "Alternatively load urae_4k_adapter_lora_conversion_dev.safetensors in the LoRA node and delete the 4K Adapter "
            "Loader.\n"
            "Settings (URAE, see the node's help page): euler, simple, 28 steps, CFG 1, FluxGuidance 3.5; keep the URAE "
            "preset at 4K and Size at 4096x4096.\n"
            "VRAM: estimated 32 GB with fp16 weights, ~20 GB with weight_dtype fp8_e4m3fn (65,536 image tokens; not "
            "measured). The 4K adapter loader runs ~190 SVDs of 3072x3072 once (seconds on a GPU).\n"
            "Time: estimated 25-40 min on an RTX 4090, 6-10 min on an H100 (attention over ~66k tokens per layer).\n"
            f"{EXACT_DECODE_TIP}")


# PASD's test_pasd.py defaults: added prompt, negative prompt, UniPC 20 steps, CFG 9, conditioning_scale 1.
PASD_PROMPT = "clean, high-resolution, 8k"  # the reference appends this to a caption of the input (CoCa/BLIP)
PASD_NEGATIVE = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"
PASD_SAMPLING = dict(sampler_name="uni_pc", scheduler="normal", steps=20, cfg=9.0)


def sd15_pasd_4x_upscale(g):
    """SD1.5 4x upscale: PASD (ControlNet + PACA)"""
    ckpt = g.add("CheckpointLoaderSimple", "Checkpoint", ckpt_name=SD15_CKPT)
    picture = g.add("LoadImage", "Input picture", image=PASD_INPUT)
    size = g.add("ImageScale", "Size", image=(picture, 0), upscale_method="bicubic", width=4096, height=4096, crop="disabled")
    unet = g.add("UltraResPASDUNetLoader", model=(ckpt, 0), unet_name=PASD_UNET)
    tiles = g.add("UltraResPASDTiledSampling", model=(unet, 0), tile_size=320, tile_overlap=8)
    controlnet = g.add("UltraResPASDControlNetLoader", model=(ckpt, 0), control_net_name=PASD_CONTROLNET)
    pos, neg = sdxl_text(g, ckpt, positive=PASD_PROMPT, negative=PASD_NEGATIVE)
    control = g.add("ControlNetApplyAdvanced", "PASD ControlNet", positive=(pos, 0), negative=(neg, 0), control_net=(controlnet, 0),
                    image=(size, 0), strength=1.0, start_percent=0.0, end_percent=1.0)
    encoded = g.add("VAEEncodeTiled", "Encode (tiled)", pixels=(size, 0), vae=(ckpt, 2), tile_size=1024, overlap=64)
    init = g.add("UltraResPASDInitLatent", model=(ckpt, 0), latent=(encoded, 0), added_noise_level=900)
    latent = g.add("KSampler", "Sampler", model=(tiles, 0), positive=(control, 0), negative=(control, 1), latent_image=(init, 0),
                   seed=0, denoise=1.0, **PASD_SAMPLING)
    decoded = g.add("VAEDecodeTiled", "Decode (tiled)", samples=(latent, 0), vae=(ckpt, 2), tile_size=512, overlap=64)
    fixed = g.add("UltraResPASDColorFix", image=(decoded, 0), reference=(size, 0), levels=5)
    g.add("SaveImage", filename_prefix="UltraRes/sd15_pasd_4x_upscale", images=(fixed, 0))
    return ("PASD 4x super-resolution on SD1.5: a 1024x1024 picture to 4096x4096. The picture is upscaled bicubically; "
            "that image is both the ControlNet hint and, encoded, the init latent.\n\n"
            f"Needs: models/checkpoints/{SD15_CKPT} (any SD1.5 model is a valid base), PASD's unet/diffusion_pytorch_model.safetensors "
            f"renamed to models/diffusion_models/{PASD_UNET}, its controlnet/diffusion_pytorch_model.safetensors renamed to "
            f"models/controlnet/{PASD_CONTROLNET} (HF yangtao9009/PASD, pasd or pasd_light; not the RRDB variants), your picture "
            f"as input/{PASD_INPUT}. For another factor, set Size to 4x your picture.\n"
            "Reference settings (PASD test_pasd.py): UniPC, 20 steps, CFG 9 (the demo uses 7.5), ControlNet strength 1.0, "
            f"positive '<caption of your picture> {PASD_PROMPT}' (write the caption yourself), negative '{PASD_NEGATIVE}', "
            "init latent noised twice (t=999, then 900), per-step latent tiling at 320 latent px with 8 px overlap (a 4096 "
            "output is 512 latent px: 4 tiles), wavelet colour fix after decode.\n"
            "VRAM: estimated from the weights, not measured: SD1.5 fp16 1.7 GB + ControlNet 0.7 GB + full PASD's PACA 0.5 GB, plus "
            "the activations of one 320x320-latent tile (PACA attends over all 102400 tokens of a tile in the top decoder level).\n"
            "Time: not measured (no GPU here): 20 steps x 4 tiles, each a UNet + ControlNet call on cond and uncond.")


def cascade_ultrapixel(g, width, height, name):
    c = g.add("CheckpointLoaderSimple", "Stage C checkpoint", ckpt_name=CASCADE_C)
    b = g.add("CheckpointLoaderSimple", "Stage B checkpoint", ckpt_name=CASCADE_B)
    guided = g.add("UltraResUltraPixelLoader", model=(c, 0), ultrapixel_name=ULTRAPIXEL)
    # UltraPixel's app appends this to every prompt; its negative prompt is empty
    pos, neg = sdxl_text(g, c, positive=PROMPT + ", rich detail, 4k, high quality", negative="")
    lr = g.add("UltraResUltraPixelLRPass", "UltraPixel LR pass", model=(guided, 0), positive=(pos, 0), negative=(neg, 0),
               width=width, height=height, seed=0)
    hr = g.add("KSampler", "Sampler (StageC, high-res)", model=(lr, 0), positive=(pos, 0), negative=(neg, 0), latent_image=(lr, 1),
               seed=0, steps=20, cfg=4.0, sampler_name="euler_ancestral", scheduler="simple", denoise=1.0)
    size = g.add("StableCascade_EmptyLatentImage", "Size", width=width, height=height, compression=42, batch_size=1)
    cond_b = g.add("StableCascade_StageB_Conditioning", conditioning=(pos, 0), stage_c=(hr, 0))
    # the negative stays plain: StageB then sees zeros as its unconditional StageC latent, as in the reference
    stage_b = g.add("KSampler", "Sampler (StageB)", model=(b, 0), positive=(cond_b, 0), negative=(neg, 0), latent_image=(size, 1),
                    seed=0, steps=10, cfg=1.1, sampler_name="euler_ancestral", scheduler="simple", denoise=1.0)
    decode_save(g, stage_b, (b, 2), f"UltraRes/{name}")
    lr_h, lr_w = ultrapixel.lr_latent_size(height, width)
    hr_h, hr_w = ultrapixel.hr_latent_size(height, width)
    tier = ultrapixel.tier_weight(hr_h * hr_w)
    return (f"Stable Cascade {width}x{height} with UltraPixel (LR-guided StageC: a ~1024x1024 pass guides the high-res one "
            "through UltraPixel's four trained modules).\n\n"
            f"Needs: models/checkpoints/{CASCADE_C} and {CASCADE_B} (Stability AI stable-cascade, the all-in-one "
            f"checkpoints); models/diffusion_models/{ULTRAPIXEL} (Hugging Face roubaofeipi/UltraPixel, 211 MB, loaded as "
            "released).\n"
            f"Reference settings (UltraPixel inference): StageC 20 steps, CFG 4, shift 1, CFG rescale 0.7 (the LR pass "
            f"node sets shift and rescale on the MODEL it returns), ancestral sampling, simple schedule; LR latent "
            f"{lr_w}x{lr_h}, HR latent {hr_w}x{hr_h}, up-path guide weight {tier}. StageB 10 steps, CFG 1.1; StageA decodes tiled.\n"
            "VRAM: estimated 20 GB at 4096x4096 with bf16 stage C (the reference measures 18.7 GB on an A100 for StageC and "
            "19.9 GB on a 4090; not measured here). StageB/StageA need less with the tiled decode.\n"
            "Time: estimated 3-5 min on an RTX 4090 (the reference: 153 s for StageC at 4096x4096 on a 4090; not measured here).\n"
            "Change the size in both 'UltraPixel LR pass' and 'Size'.")


def cascade_ultrapixel_4096(g):
    """Stable Cascade 4096x4096: UltraPixel (LR-guided StageC)"""
    return cascade_ultrapixel(g, 4096, 4096, "cascade_ultrapixel_4096")


def cascade_ultrapixel_2560x5120(g):
    """Stable Cascade 2560x5120 (1:2): UltraPixel"""
    return cascade_ultrapixel(g, 2560, 5120, "cascade_ultrapixel_2560x5120")


BUILDERS = [sdxl_4096_redilate_ndcfg, sdxl_4096_cutdiffusion, sdxl_4096_lr_guided, sdxl_2048x4096_cutdiffusion,
            sd15_2048_scalecrafter, toy_world_4x_compare, flux_4096_urae, sd15_pasd_4x_upscale, cascade_ultrapixel_4096,
            cascade_ultrapixel_2560x5120]


# ---- thumbnail ----------------------------------------------------------------------------------

COLOURS = {"UltraRes": (222, 128, 40), "Loader": (70, 110, 190), "KSampler": (60, 150, 90), "Note": (120, 100, 60)}


def thumbnail(ui: dict, caption: str, path: pathlib.Path, size=(400, 300)) -> None:
    """The graph drawn small (boxes at the node positions, links as lines) under a caption."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, (32, 34, 38))
    draw = ImageDraw.Draw(img)
    nodes = {n["id"]: n for n in ui["nodes"] if n["type"] != "Note"}
    x0 = min(n["pos"][0] for n in nodes.values())
    y0 = min(n["pos"][1] for n in nodes.values())
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes.values())
    top = 70
    scale = min((size[0] - 20) / (x1 - x0), (size[1] - top - 10) / (y1 - y0))
    at = lambda x, y: (10 + (x - x0) * scale, top + (y - y0) * scale)
    for _, src, _, dst, *_ in ui["links"]:
        a, b = nodes[src], nodes[dst]
        draw.line([at(a["pos"][0] + a["size"][0], a["pos"][1] + 20), at(b["pos"][0], b["pos"][1] + 20)], fill=(150, 150, 160), width=1)
    for n in nodes.values():
        kind = "UltraRes" if n["type"].startswith("UltraRes") else "Loader" if "Loader" in n["type"] else n["type"]
        x, y = at(*n["pos"])
        draw.rounded_rectangle([x, y, x + n["size"][0] * scale, y + n["size"][1] * scale], radius=3,
                               fill=COLOURS.get(kind, (90, 92, 100)), outline=(20, 20, 20))
    font = ImageFont.load_default(size=17)
    small = ImageFont.load_default(size=12)
    title, _, rest = caption.partition(":")
    draw.text((10, 10), "UltraRes  " + title.strip(), fill=(245, 245, 245), font=font)
    draw.text((10, 36), rest.strip()[:62], fill=(200, 200, 205), font=small)
    img.save(path, "JPEG", quality=82, optimize=True)


def build_all(info: dict, out: pathlib.Path = WORKFLOWS) -> list[str]:
    from ultrares.client import ui_to_api

    (out / "api").mkdir(parents=True, exist_ok=True)
    names = []
    for build in BUILDERS:
        g = Graph(info)
        note = build(g)
        ui = g.ui(note)
        name = build.__name__
        (out / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
        (out / "api" / f"{name}.json").write_text(json.dumps(ui_to_api(ui, info), indent=1) + "\n")
        thumbnail(ui, build.__doc__, out / f"{name}.jpg")
        names.append(name)
    return names


def main():
    import workflow_host

    with tempfile.TemporaryDirectory(prefix="ultrares-build-") as tmp:
        with workflow_host.server(pathlib.Path(tmp)) as srv:
            info = srv.get("/object_info")
    print("\n".join(build_all(info)))


if __name__ == "__main__":
    main()
