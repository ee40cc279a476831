"""URAE for FLUX.1 dev/schnell: the 2K/4K inference patch (NTK RoPE, proportional attention, sampling
shift) and the loader for the 4K minor-component adapter. The 2K adapter loads with the stock
LoraLoaderModelOnly; see web/docs/UltraResURAEFlux.md."""

import math

import torch
from comfy_api.v0_0_2 import io

import comfy.ldm.flux.model
import comfy.lora
import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sd
import comfy.utils
import folder_paths

from ..patches import urae
from .common import category, input_error

WRAPPER_KEY = "ultrares.urae"
# Output sizes of the two presets; the reference uses the same NTK/PA/shift settings for both.
PRESETS = {"2K (2048x2048)": 2048, "4K (4096x4096)": 4096}
# URAE's FLUX.1-dev schedule: diffusers' static shift 3 (sigma' = 3s / (1 + 2s)) = ComfyUI's mu = ln 3.
DEV_SHIFT_MU = math.log(3.0)


def flux_model(model, node: str):
    """The Flux DiT inside `model`, or a clear error for any other family (Flux 2, Chroma, UNets...)."""
    base = model.model
    dit = getattr(base, "diffusion_model", None)
    if type(base) is not comfy.model_base.Flux or not isinstance(dit, comfy.ldm.flux.model.Flux) or len(dit.params.axes_dim) != 3:
        raise input_error(node, "model", f"this is a {type(base).__name__} model, not FLUX.1 (dev or schnell)",
                          "connect a FLUX.1 dev/schnell model (Load Diffusion Model / Load Checkpoint)")
    return dit


class URAEModelSampling(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
    """FLUX flow sampling with a fixed shift (what ComfyUI's ModelSamplingFlux node builds)."""


def reference_sampling(model):
    """URAE's schedule, or None where it equals the model's own: dev gets the static shift 3 that the
    diffusers FLUX.1-dev scheduler applies; schnell (ModelSamplingDiscreteFlow, shift 1) is left alone."""
    if not isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.ModelSamplingFlux):
        return None
    sampling = URAEModelSampling(model.model.model_config)
    sampling.set_parameters(shift=DEV_SHIFT_MU)
    return sampling


class URAEFlux(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResURAEFlux",
            display_name="URAE FLUX patch",
            category=category("URAE"),
            description="URAE's 2K/4K inference settings for FLUX.1 dev/schnell on a clone of the model: RoPE with "
                        "NTK-scaled theta, proportional attention (logits x sqrt(log_4608 of the token count)) and "
                        "the reference sampling shift. Load the URAE 2K adapter (LoraLoaderModelOnly) or the 4K "
                        "adapter (URAE 4K Adapter Loader) before or after it, and sample at the preset size.",
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1 dev or schnell model."),
                io.Combo.Input("preset", options=list(PRESETS), default="2K (2048x2048)",
                               tooltip="Target resolution; sets the width/height outputs (wire them into EmptySD3LatentImage). "
                                       "URAE uses the same patch settings for 2K and 4K; what differs is the adapter: "
                                       "urae_2k_adapter for 2K, the 4K adapter for 4K."),
                io.Float.Input("ntk_factor", default=10.0, min=1.0, max=1000.0, step=0.1,
                               tooltip="RoPE theta = 10000 x this on every axis (URAE: 10). 1 = FLUX's own RoPE."),
                io.Boolean.Input("proportional_attention", default=True,
                                 tooltip="Scale attention logits by sqrt(log_4608 N), N = text + image tokens, so attention "
                                         "stays as sharp at 2K/4K as at 1024x1024 (URAE: on)."),
                io.Boolean.Input("sampling_shift", default=True,
                                 tooltip="Use URAE's schedule: dev gets the static shift 3 (replaces any ModelSamplingFlux "
                                         "applied before, whose resolution-based shift is far larger at 2K/4K); schnell keeps "
                                         "its unshifted schedule."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Int.Output(display_name="width"),
                io.Int.Output(display_name="height"),
            ],
        )

    @classmethod
    def execute(cls, model, preset, ntk_factor, proportional_attention, sampling_shift) -> io.NodeOutput:
        node = "URAE FLUX patch"
        dit = flux_model(model, node)
        if preset not in PRESETS:
            raise input_error(node, "preset", f"unknown preset {preset!r}", f"pick one of {list(PRESETS)}")
        if not ntk_factor > 0:
            raise input_error(node, "ntk_factor", f"{ntk_factor} is not positive", "use 10 (URAE) or 1 (off)")
        m = model.clone()
        base = m.get_model_object("diffusion_model.pe_embedder")
        m.add_object_patch("diffusion_model.pe_embedder", urae.ntk_pe_embedder(base, dit.params.theta, ntk_factor))
        # One URAE wrapper per model however often the node is applied: re-applying replaces the settings.
        m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
        if proportional_attention:
            m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, urae.proportional_attention_wrapper)
        sampling = reference_sampling(model) if sampling_shift else None
        if sampling is not None:
            m.add_object_patch("model_sampling", sampling)
        size = PRESETS[preset]
        return io.NodeOutput(m, size, size)


def patched_weights(model, device):
    """Function returning a model weight with every weight patch on `model` applied (LoRAs such as the
    2K adapter included), in float32 on `device`; fused weights are computed once per key."""
    entries = model.get_key_patches("diffusion_model.")
    cache = {}

    def weight(key: str) -> torch.Tensor:
        if key not in cache:
            cache.clear()
            (base, convert), patches = entries[key][0], entries[key][1:]
            w = convert(comfy.model_management.cast_to_device(base, device, torch.float32, copy=True), inplace=True)
            cache[key] = comfy.lora.calculate_weight(patches, w, key, intermediate_dtype=torch.float32)
        return cache[key]

    return weight


class URAE4KAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResURAE4KAdapterLoader",
            display_name="URAE 4K Adapter Loader",
            category=category("URAE"),
            description="Applies URAE's 4K minor-component adapter (urae_4k_adapter.safetensors) to a clone of a FLUX "
                        "model that already carries the 2K adapter: each adapted attention weight W' is split by SVD and "
                        "its 16 smallest singular directions (B0 A0) are replaced by the adapter: W' - B0 A0 + B4k A4k. "
                        "The already converted 'urae_4k_adapter_lora_conversion_*' files need no node: use LoraLoaderModelOnly.",
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1 dev/schnell with urae_2k_adapter loaded (LoraLoaderModelOnly, strength 1)."),
                io.Combo.Input("adapter_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="urae_4k_adapter.safetensors in models/loras (380 tensors: ...attn.processor.to_q_a.weight etc.)."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=2.0, step=0.01,
                               tooltip="Multiplies the weight change B4k A4k - B0 A0 (1 = the reference)."),
                io.Boolean.Input("require_2k_adapter", default=True,
                                 tooltip="Stop with an error when the adapted weights carry no patch: the 4K adapter was trained "
                                         "on FLUX + 2K adapter. Turn off only if the 2K adapter is merged into the checkpoint."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, adapter_name) -> bool | str:
        """At /prompt time, like the stock loaders' file lists (the host checks no V3 combo's value)."""
        files = folder_paths.get_filename_list("loras")
        if adapter_name in files:
            return True
        return (f"URAE 4K Adapter Loader: input 'adapter_name': {adapter_name!r} is not in models/loras "
                f"({len(files)} files there). Fix: put urae_4k_adapter.safetensors into models/loras and pick it from the list")

    @classmethod
    def execute(cls, model, adapter_name, strength, require_2k_adapter) -> io.NodeOutput:
        node = "URAE 4K Adapter Loader"
        flux_model(model, node)
        path = folder_paths.get_full_path("loras", adapter_name)
        if path is None or not path.endswith(".safetensors"):
            raise input_error(node, "adapter_name", f"{adapter_name!r} is not a .safetensors file in models/loras",
                              "download urae_4k_adapter.safetensors (Hugging Face Huage001/URAE) into models/loras")
        adapter = comfy.utils.load_torch_file(path, safe_load=True)
        try:
            modules = urae.parse_minor_component_adapter(adapter)
        except ValueError as e:
            raise input_error(node, "adapter_name", str(e), "pick urae_4k_adapter.safetensors; load LoRA files with LoraLoaderModelOnly") from None

        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        targets = {}
        for module in modules:
            target = key_map.get(f"transformer.{module}")
            if target is None:
                raise input_error(node, "adapter_name", f"the adapter targets {module}, which this FLUX model does not have",
                                  "use the adapter made for this model (FLUX.1 dev/schnell, 19 double + 38 single blocks)")
            targets[module] = target if isinstance(target, tuple) else (target, None)
        if require_2k_adapter and not any(key in model.patches for key, _ in targets.values()):
            raise input_error(node, "model", "the attention weights carry no patch, so the 2K adapter is not loaded",
                              "load urae_2k_adapter.safetensors with LoraLoaderModelOnly (strength 1) before this node, "
                              "or turn off require_2k_adapter if it is merged into the checkpoint")

        weight_of = patched_weights(model, model.load_device)

        def fused_weight(module):
            key, offset = targets[module]
            w = weight_of(key)
            return w if offset is None else w.narrow(*offset)

        progress = comfy.utils.ProgressBar(len(modules))

        def on_module():
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update(1)

        try:
            with torch.no_grad():
                lora = urae.minor_component_lora(adapter, fused_weight, on_module)
        except ValueError as e:
            raise input_error(node, "adapter_name", str(e), "use the 4K adapter made for this model's size") from None
        m, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
        return io.NodeOutput(m)


NODES = [URAEFlux, URAE4KAdapterLoader]
