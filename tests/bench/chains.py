"""The real model architectures (from ComfyUI's own model classes and the configs its model detection
builds for the released checkpoints) and the node chains of the bundled workflows, read from
workflows/api/*.json, for the full-size cost count (full_size_cost.py, meta tensors) and the GPU
timing script (gpu_4k.py, random weights). Import after tests/host.py has bootstrapped ComfyUI."""

import json
import pathlib
from dataclasses import dataclass, field

import torch

import comfy.model_detection
import comfy.model_patcher
import comfy.supported_models

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows" / "api"

_UNET = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2,
             use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False)
# What comfy/model_detection.py detects for the released checkpoints (UNets in the compact form it converts).
UNET_CONFIGS = {
    "SD1.5": dict(_UNET, channel_mult=[1, 2, 4, 4], attention_resolutions=[1, 2, 4], transformer_depth=1, transformer_depth_middle=1,
                  context_dim=768, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False, adm_in_channels=None),
    "SDXL": dict(_UNET, channel_mult=[1, 2, 4], attention_resolutions=[2, 4], transformer_depth=[0, 2, 10], transformer_depth_middle=10,
                 context_dim=2048, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential"),
}
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
            "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
            "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True}


@dataclass(frozen=True)
class Arch:
    """One model family: its ComfyUI model config class and config, native latent side, latent
    channels, the dtype it runs in, and the conditioning its apply_model takes (shapes per item)."""

    name: str
    config_class: type
    config: dict
    native: int  # latent px
    channels: int
    dtype: torch.dtype
    conds: dict = field(default_factory=dict)  # name -> per-item shape
    px_per_latent: int = 8

    def unet_config(self) -> dict:
        if "channel_mult" in self.config:
            return comfy.model_detection.convert_config(dict(self.config, dtype=self.dtype))
        return dict(self.config)


ARCHS = {
    "SD1.5": Arch("SD1.5", comfy.supported_models.SD15, UNET_CONFIGS["SD1.5"], 64, 4, torch.float16, {"c_crossattn": (77, 768)}),
    "SDXL": Arch("SDXL", comfy.supported_models.SDXL, UNET_CONFIGS["SDXL"], 128, 4, torch.float16,
                 {"c_crossattn": (77, 2048), "y": (2816,)}),
    "FLUX.1-dev": Arch("FLUX.1-dev", comfy.supported_models.Flux, FLUX_DEV, 128, 16, torch.bfloat16,
                       {"c_crossattn": (512, 4096), "y": (768,), "guidance": ()}),
    # 1024x1024 px = 24x24 in StageC's 42x compressed latent
    "Stable Cascade StageC": Arch("Stable Cascade StageC", comfy.supported_models.Stable_Cascade_C, {"stable_cascade_stage": "c"},
                                  24, 16, torch.bfloat16, {"clip_text": (77, 1280), "clip_text_pooled": (1, 1280), "clip_img": (1, 768)},
                                  px_per_latent=42),
}


def tiny_configs() -> dict:
    """Small versions of the families with the same conditioning widths and level structure, so
    every workflow chain applies unchanged (smoke runs of the benchmarks on a CPU)."""
    small = dict(model_channels=32, num_res_blocks=1, num_head_channels=16, transformer_depth_middle=1)

    def unet(arch, **changes):
        return comfy.model_detection.convert_config(dict(UNET_CONFIGS[arch], **small, **changes, dtype=ARCHS[arch].dtype))

    return {"SD1.5": unet("SD1.5", num_heads=-1, transformer_depth=1), "SDXL": unet("SDXL", transformer_depth=[0, 1, 1]),
            "FLUX.1-dev": dict(FLUX_DEV, hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12])}


# The checkpoint file names the workflows load -> family
FILES = {"sd_xl_base_1.0.safetensors": "SDXL", "v1-5-pruned-emaonly.safetensors": "SD1.5", "flux1-dev.safetensors": "FLUX.1-dev"}
LOADERS = ("CheckpointLoaderSimple", "UNETLoader")
# Nodes that only change weights (LoRA merges): no effect on compute, skipped when the weights are not real.
WEIGHT_ONLY = ("LoraLoaderModelOnly", "UltraResURAE4KAdapterLoader")


def build(arch: Arch, device="meta", dtype=None, config: dict | None = None) -> comfy.model_patcher.ModelPatcher:
    """The model through ComfyUI's model config (BaseModel subclass, model_sampling, diffusion model)
    with uninitialised weights on `device` (meta: no memory at all)."""
    dtype = dtype or arch.dtype
    unet_config = config if config is not None else arch.unet_config()
    if unet_config.get("image_model") == "flux":
        from tiny_models import flux_host_config  # the FLUX config as this host's Flux class takes it

        unet_config = flux_host_config(unet_config)
    model_config = arch.config_class(dict(unet_config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    if device != "meta":
        model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device), offload_device=torch.device(device))


def conds(arch: Arch, batch: int, device="meta", dtype=None, fill=None) -> dict:
    """apply_model conditioning for `batch` items (uninitialised on meta, `fill(shape)` elsewhere)."""
    dtype = dtype or arch.dtype
    make = fill or (lambda shape: torch.empty(shape, device=device, dtype=dtype))
    return {name: (torch.full((batch,), 3.5, device=device) if name == "guidance" else make((batch, *shape)))
            for name, shape in arch.conds.items()}


@dataclass
class Sampling:
    """One sampler of a workflow: the model chain (node class, widget inputs) after the loader, the
    target latent size, the sampler settings, and which earlier sampling feeds a node's latent input."""

    name: str
    arch: str
    nodes: list  # [(class_type, {input: value}, {input: index of the Sampling whose output it takes})]
    width: int  # image px
    height: int
    steps: int
    cfg: float
    sampler: str
    scheduler: str


def read_workflow(path: pathlib.Path) -> list[Sampling]:
    """Every KSampler of an API-format workflow, in execution order, with its model chain."""
    graph = json.loads(path.read_text())
    samplers = [nid for nid, n in graph.items() if n["class_type"] == "KSampler"]
    order = {}

    def visit(nid):  # samplers that feed others come first
        for value in graph[nid]["inputs"].values():
            if isinstance(value, list):
                upstream(value[0])
        order.setdefault(nid, len(order))

    def upstream(nid):
        if graph[nid]["class_type"] == "KSampler":
            visit(nid)
        for value in graph[nid]["inputs"].values():
            if isinstance(value, list):
                upstream(value[0])

    for nid in samplers:
        visit(nid)
    index = {nid: i for i, nid in enumerate(sorted(order, key=order.get))}
    out = []
    for nid in sorted(order, key=order.get):
        inputs = graph[nid]["inputs"]
        chain, arch, link = [], None, inputs["model"][0]
        while True:
            node = graph[link]
            if node["class_type"] in LOADERS:
                arch = FILES[node["inputs"].get("ckpt_name") or node["inputs"]["unet_name"]]
                break
            widgets = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
            latents = {k: index[v[0]] for k, v in node["inputs"].items() if isinstance(v, list) and graph[v[0]]["class_type"] == "KSampler"}
            chain.insert(0, (node["class_type"], widgets, latents))
            link = node["inputs"]["model"][0]
        size = graph[inputs["latent_image"][0]]["inputs"]
        title = graph[nid].get("_meta", {}).get("title", nid)
        out.append(Sampling(title, arch, chain, size["width"], size["height"], inputs["steps"], inputs["cfg"],
                            inputs["sampler_name"], inputs["scheduler"]))
    return out


# The nodes that load a model a workflow computes with, and their file input.
MODEL_FILE_INPUTS = {"CheckpointLoaderSimple": "ckpt_name", "UNETLoader": "unet_name", "UltraResPASDUNetLoader": "unet_name",
                     "UltraResPASDControlNetLoader": "control_net_name", "UltraResUltraPixelLoader": "ultrapixel_name"}


def _model_files(graph: dict) -> list[str]:
    return [n["inputs"][MODEL_FILE_INPUTS[n["class_type"]]] for n in graph.values() if n["class_type"] in MODEL_FILE_INPUTS]


def workflows(names=None) -> dict[str, list[Sampling]]:
    """The bundled workflows that run a model family counted here (the toy world's is left out, and so are
    those `uncounted()` names)."""
    out = {}
    for path in sorted(WORKFLOWS.glob("*.json")):
        if names and path.stem not in names:
            continue
        files = _model_files(json.loads(path.read_text()))
        if files and all(f in FILES for f in files):
            out[path.stem] = read_workflow(path)
    return out


def uncounted() -> dict[str, list[str]]:
    """Bundled workflows on models this accounting does not build yet (PASD's ControlNet + PACA, Stable
    Cascade's StageB and UltraPixel's LR pass): {workflow: its model files not in FILES}."""
    out = {}
    for path in sorted(WORKFLOWS.glob("*.json")):
        missing = [f for f in _model_files(json.loads(path.read_text())) if f not in FILES]
        if missing:
            out[path.stem] = missing
    return out


def apply_chain(patcher, sampling: Sampling, outputs: list, overrides: dict | None = None):
    """Run the sampling's model nodes on `patcher` (the loader's output), as ComfyUI would.
    outputs[i]: the latent dict sampling i produced (for LR guidance inputs). overrides:
    {class_type: {input: value}} changed for every node of that class (e.g. a test's tiny patch size)."""
    import host

    nodes = host.load_nodes()
    model = patcher
    for class_type, widgets, latents in sampling.nodes:
        if class_type in WEIGHT_ONLY:
            continue
        inputs = dict(widgets, **(overrides or {}).get(class_type, {}))
        inputs.update({k: outputs[i] for k, i in latents.items()})
        model = host.run_node(nodes[class_type], model=model, **inputs)[0]
    return model
