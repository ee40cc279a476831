"""PASD on ComfyUI's native SD1.5: the loaders of its released weights and PACA in the UNet forward.

- PASD UNet Loader reads only the PACA weights of PASD's `unet/diffusion_pytorch_model.safetensors`
  and returns a clone of any SD1.5-family MODEL carrying them (the file's own SD1.5 base is not needed).
- PASD ControlNet Loader reads PASD's `controlnet/diffusion_pytorch_model.safetensors` (diffusers
  layout) into ComfyUI's own ControlNet class for the connected MODEL's architecture, and says what it
  drops (the training-only `to_rgbs` heads) and what it refuses (the RRDB variants).

How PACA reaches the forward, all on the clone (see patches/pasd.py for the layouts):
- an APPLY_MODEL wrapper copies the ControlNet's per-skip residuals of this call (`control['output']`,
  already zero-conv'd and strength-scaled; the UNet pops that list) into transformer_options;
- full PASD: a PatcherInjection inserts a PACALayer into each output block, after its ResBlock / text
  transformer and before its upsampler (the reference order); a forward_timestep_embed_patch runs it;
- PASD-light: a middle_patch keeps the state before the text cross-attention and an attn2_output_patch
  adds attn2_plus(norm2_plus(x + attn2), proj_in_plus(residual)) to it, inside the decoder's text transformers.
"""

import logging
import os

import safetensors
import torch
from comfy_api.v0_0_2 import io

import comfy.cldm.cldm
import comfy.controlnet
import comfy.ldm.modules.attention as attention
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.model_management
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models
import comfy.utils
import folder_paths

from ..patches import pasd
from .common import category, input_error

KEY = "ultrares.pasd"
CONTROL_KEY = "ultrares_pasd_control"  # transformer_options: this call's ControlNet residuals (input-block order)
STATE_KEY = "ultrares_pasd_state"  # per text-transformer block (extra_options): the state before attn2
UNET_LOADER, CONTROLNET_LOADER = "PASD UNet Loader", "PASD ControlNet Loader"
OPS = comfy.ops.disable_weight_init  # weights come from the file


def sd15_unet(model, node: str):
    """The UNet of an SD1.5-family model, or a clear error naming the node's model input."""
    config = getattr(model.model, "model_config", None)
    unet = getattr(model.model, "diffusion_model", None)
    if not isinstance(config, comfy.supported_models.SD15) or not isinstance(unet, openaimodel.UNetModel):
        raise input_error(node, "model", f"this is a {type(config).__name__} model, not SD1.5",
                          "connect an SD1.5 model (Load Checkpoint with any SD1.5 checkpoint or fine-tune): PASD is trained on SD1.5")
    return unet


def decoder_of(model) -> list[pasd.DecoderLayer]:
    c = model.model.model_config.unet_config
    return pasd.decoder_layout(c["model_channels"], c["channel_mult"], c["num_res_blocks"])


def text_transformer_depths(unet) -> dict[int, int]:
    """Output block -> depth of its text transformer, for the blocks that have one (PASD-light's)."""
    depths = {}
    for n, block in enumerate(unet.output_blocks):
        for layer in block:
            if isinstance(layer, attention.SpatialTransformer):
                depths[n] = len(layer.transformer_blocks)
    return depths


def _on(module: torch.nn.Module, like: torch.Tensor) -> torch.nn.Module:
    """Move PACA weights to where the UNet computes (the first call on a device pays for it once)."""
    p = next(module.parameters())
    if p.device != like.device or p.dtype != like.dtype:
        module.to(device=like.device, dtype=like.dtype)
    return module


def _residual(options: dict, index: int):
    control = options.get(CONTROL_KEY)
    if not control:
        return None
    return control[pasd.control_index(len(control), index)]


# ---- the modules, from the file's weights --------------------------------------------------------

class PACALayer(torch.nn.Module):
    """Full PASD's pixel-aware cross-attention after one decoder layer: a depth-1 SpatialTransformer whose
    cross-attention reads the ControlNet residual of the same skip. Called by `paca_handler`; a plain
    call (no handler: the patch is not active) leaves x unchanged."""

    def __init__(self, index: int, channels: int, skip_channels: int, device=None):
        super().__init__()
        self.index = index
        self.transformer = attention.SpatialTransformer(channels, pasd.HEADS, channels // pasd.HEADS, depth=1, context_dim=skip_channels,
                                                        use_linear=False, device=device, operations=OPS)

    def forward(self, x, *args, **kwargs):
        return x


def paca_handler(layer, x, emb, context, transformer_options, *args):
    residual = _residual(transformer_options, layer.index)
    if residual is None:
        return x
    block = _on(layer.transformer, x)
    return block(x, context=pasd.tokens(residual.to(x)), transformer_options={})  # ours alone: no other pack's attention patches


class LightBlock(torch.nn.Module):
    def __init__(self, channels, skip_channels, device=None):
        super().__init__()
        self.norm2_plus = OPS.LayerNorm(channels, device=device)
        self.attn2_plus = attention.CrossAttention(channels, skip_channels, pasd.HEADS, channels // pasd.HEADS, device=device, operations=OPS)


class LightPACA(torch.nn.Module):
    """PASD-light's additions to one decoder text transformer (proj_in_plus + per block norm2_plus/attn2_plus)."""

    def __init__(self, channels, skip_channels, depth, device=None):
        super().__init__()
        self.proj_in_plus = OPS.Conv2d(skip_channels, skip_channels, 1, device=device)
        self.transformer_blocks = torch.nn.ModuleList(LightBlock(channels, skip_channels, device) for _ in range(depth))


class LightPatch:
    """middle_patch (remember x before attn2) and attn2_output_patch (add PACA to attn2's output, so that
    the block's `x += n` gives x + attn2 + PACA, the reference order), for the output blocks in `modules`.
    Immutable, so clones share it (model_options are deep-copied on clone)."""

    def __init__(self, modules: dict[int, LightPACA]):
        self.modules = modules

    def __deepcopy__(self, memo):
        return self

    def _target(self, extra_options):
        block = extra_options.get("block")
        return self.modules.get(block[1]) if block is not None and block[0] == "output" else None

    def middle(self, x, extra_options):
        if self._target(extra_options) is not None:
            extra_options[STATE_KEY] = x
        return x

    def attn2_output(self, n, extra_options):
        module = self._target(extra_options)
        residual = None if module is None else _residual(extra_options, extra_options["block"][1])
        if residual is None or STATE_KEY not in extra_options:
            return n
        module = _on(module, n)
        context = pasd.tokens(module.proj_in_plus(residual.to(n)))
        block = module.transformer_blocks[extra_options.get("block_index", 0)]
        return n + block.attn2_plus(block.norm2_plus(extra_options.pop(STATE_KEY) + n), context=context)


def build_paca(variant: str, per_layer: dict[int, dict], layers: list[pasd.DecoderLayer], depths: dict[int, int], device=None) -> dict[int, torch.nn.Module]:
    """Output block -> PACA module with the file's weights (assigned, so meta tensors stay meta)."""
    out = {}
    for n, sd in sorted(per_layer.items()):
        layer = layers[n]
        if variant == pasd.FULL:
            module = PACALayer(n, layer.channels, layer.skip_channels, device)
            sd = {f"transformer.{k}": v for k, v in sd.items()}
        else:
            module = LightPACA(layer.channels, layer.skip_channels, depths[n], device)
        module.load_state_dict(sd, strict=True, assign=True)
        out[n] = module.eval().requires_grad_(False)
    return out


def read_paca(model, shapes: dict, read, node: str = UNET_LOADER, input_name: str = "unet_name"):
    """(variant, {output block: module}) for `model` from a file's key -> shape map and a reader of its tensors."""
    unet = sd15_unet(model, node)
    layers, depths = decoder_of(model), text_transformer_depths(unet)
    fix = "pick PASD's unet/diffusion_pytorch_model.safetensors (pasd or pasd_light checkpoint) made for SD1.5"
    try:
        variant = pasd.detect_variant(shapes)
        keys = pasd.paca_keys(shapes, variant)
        pasd.check_shapes({k: shapes[k] for k in keys}, pasd.released_keys(variant, layers, depths))
    except pasd.PASDFileError as e:
        raise input_error(node, input_name, str(e), fix) from None
    tensors = {k: read(k) for k in keys}
    device = next(iter(tensors.values())).device
    return variant, build_paca(variant, pasd.layer_state_dicts(tensors, variant, layers), layers, depths, device)


# ---- patching the clone ---------------------------------------------------------------------------

def control_to_options(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    """APPLY_MODEL wrapper: this call's ControlNet residuals, copied before the UNet pops them, in a copy of
    transformer_options (so nothing outlives the call)."""
    options = dict(transformer_options)
    options[CONTROL_KEY] = list(control["output"]) if control and control.get("output") else None
    return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def _injection(modules: dict[int, PACALayer]):
    def inject(patcher):
        unet = patcher.model.diffusion_model
        for n, layer in modules.items():
            block = unet.output_blocks[n]
            if any(m is layer for m in block):
                continue
            at = next((i for i, m in enumerate(block) if isinstance(m, openaimodel.Upsample)), len(block))
            block.insert(at, layer)

    def eject(patcher):
        unet = patcher.model.diffusion_model
        for n in modules:
            block = unet.output_blocks[n]
            for i in reversed(range(len(block))):
                if isinstance(block[i], PACALayer):
                    del block[i]

    return comfy.patcher_extension.PatcherInjection(inject=inject, eject=eject)


def _without_ours(model) -> None:
    """Drop every PASD patch a previous application put on this clone: re-applying replaces."""
    patches = model.model_options["transformer_options"].get("patches", {})
    for name in ("forward_timestep_embed_patch", "middle_patch", "attn2_output_patch"):
        if name in patches:
            patches[name] = [p for p in patches[name] if not _is_ours(p)]
    model.remove_injections(KEY)
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY)


def _is_ours(p) -> bool:
    if isinstance(p, tuple):
        return p[0] is PACALayer
    return isinstance(getattr(p, "__self__", None), LightPatch)


def with_paca(model, variant: str, modules: dict[int, torch.nn.Module]):
    """A clone of `model` running `modules` as PACA."""
    m = model.clone()
    _without_ours(m)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY, control_to_options)
    if variant == pasd.FULL:
        m.set_injections(KEY, [_injection(modules)])
        m.set_model_forward_timestep_embed_patch((PACALayer, paca_handler))
    else:
        patch = LightPatch(modules)
        m.set_model_patch(patch.middle, "middle_patch")
        m.set_model_attn2_output_patch(patch.attn2_output)
    return m


def read_safetensors(node: str, input_name: str, path: str, fix: str):
    """(key -> shape, reader) of a safetensors file without loading it whole; a clear error for a broken one."""
    name = os.path.basename(path)
    try:
        handle = safetensors.safe_open(path, framework="pt", device="cpu")
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as e:  # safetensors reports a bad header / short file as its own error types
        raise input_error(node, input_name, f"{name} is not a readable safetensors file ({e}); truncated or incomplete download?", fix) from None

    def read(key):
        try:
            return handle.get_tensor(key)
        except Exception as e:
            raise input_error(node, input_name, f"{name}: tensor {key} cannot be read ({e}); truncated file?", fix) from None

    return shapes, read


class PASDUNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResPASDUNetLoader",
            display_name=UNET_LOADER,
            category=category("PASD"),
            description="Adds PASD's pixel-aware cross-attention (PACA) to a clone of an SD1.5 MODEL. Give it PASD's "
                        "unet/diffusion_pytorch_model.safetensors (full PASD or PASD-light: told apart by its keys); only the "
                        "PACA weights are read, so any SD1.5 checkpoint or fine-tune is the base. PACA reads the residuals of "
                        "the PASD ControlNet applied to the conditioning; without a ControlNet it does nothing.",
            inputs=[
                io.Model.Input("model", tooltip="Any SD1.5-family MODEL (the base PASD's PACA was trained on: SD1.5)."),
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="PASD's unet/diffusion_pytorch_model.safetensors (renamed, in models/diffusion_models)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A clone of the model with PACA in its decoder.")],
        )

    @classmethod
    def execute(cls, model, unet_name) -> io.NodeOutput:
        sd15_unet(model, UNET_LOADER)
        fix = "download PASD's unet/diffusion_pytorch_model.safetensors (pasd or pasd_light) into models/diffusion_models"
        path = folder_paths.get_full_path("diffusion_models", unet_name)
        if path is None or not path.endswith(".safetensors"):
            raise input_error(UNET_LOADER, "unet_name", f"{unet_name!r} is not a .safetensors file in models/diffusion_models", fix)
        shapes, read = read_safetensors(UNET_LOADER, "unet_name", path, fix)
        variant, modules = read_paca(model, shapes, read)
        logging.info("%s: %s with PACA in %d decoder layers from %s", UNET_LOADER, variant, len(modules), unet_name)
        return io.NodeOutput(with_paca(model, variant, modules))


# ---- ControlNet ------------------------------------------------------------------------------------

def diffusers_controlnet_keys(unet_config: dict, keys) -> dict[str, str]:
    """Diffusers ControlNet key -> ComfyUI cldm key, for the architecture of `unet_config` (the mapping
    ComfyUI's own loader uses, for any SD1.5-family size)."""
    mapping = dict(comfy.utils.unet_to_diffusers(unet_config))
    mapping.update({"controlnet_mid_block.weight": "middle_block_out.0.weight", "controlnet_mid_block.bias": "middle_block_out.0.bias"})
    for k in keys:
        if k.startswith("controlnet_down_blocks."):
            n, suffix = k[len("controlnet_down_blocks."):].split(".", 1)
            mapping[k] = f"zero_convs.{n}.0.{suffix}"
        elif k.startswith("controlnet_cond_embedding.blocks."):
            n, suffix = k[len("controlnet_cond_embedding.blocks."):].split(".", 1)
            mapping[k] = f"input_hint_block.{2 * int(n) + 2}.{suffix}"
    for s in ("weight", "bias"):
        mapping[f"controlnet_cond_embedding.conv_in.{s}"] = f"input_hint_block.0.{s}"
        mapping[f"controlnet_cond_embedding.conv_out.{s}"] = f"input_hint_block.14.{s}"
    return mapping


TRAINING_ONLY = "controlnet_cond_embedding.to_rgbs."


def controlnet_to_diffusers(unet_config: dict, sd: dict) -> dict:
    """The inverse: a ComfyUI cldm ControlNet state dict in the released diffusers layout (the toy PASD is saved so)."""
    hint = {0: "conv_in", 14: "conv_out"} | {2 * i + 2: f"blocks.{i}" for i in range(6)}
    inverse = {v: k for k, v in comfy.utils.unet_to_diffusers(unet_config).items()}
    out = {}
    for k, v in sd.items():
        if k.startswith("zero_convs."):
            n, _, suffix = k[len("zero_convs."):].split(".", 2)
            out[f"controlnet_down_blocks.{n}.{suffix}"] = v
        elif k.startswith("middle_block_out.0."):
            out["controlnet_mid_block." + k[len("middle_block_out.0."):]] = v
        elif k.startswith("input_hint_block."):
            n, suffix = k[len("input_hint_block."):].split(".", 1)
            out[f"controlnet_cond_embedding.{hint[int(n)]}.{suffix}"] = v
        else:
            out[inverse[k]] = v
    return out


def controlnet_from_diffusers(model, sd: dict, name: str, node: str = CONTROLNET_LOADER, input_name: str = "control_net_name"):
    """ComfyUI's ControlNet (comfy.cldm.cldm.ControlNet in comfy.controlnet.ControlNet) from a PASD ControlNet state dict."""
    fix = "pick PASD's controlnet/diffusion_pytorch_model.safetensors of a non-RRDB variant (pasd, pasd_light)"
    if "controlnet_cond_embedding.conv_in.weight" not in sd:
        raise input_error(node, input_name, f"{name} is not a diffusers ControlNet (no controlnet_cond_embedding.conv_in.weight)", fix)
    if any(k.startswith("controlnet_cond_embedding.preprocesser.") for k in sd):
        raise input_error(node, input_name, f"{name} is an RRDB variant of PASD (pasd_rrdb / pasd_light_rrdb: controlnet_cond_embedding."
                          "preprocesser.* holds two RRDB blocks that ComfyUI's ControlNet hint block has no place for)", fix)
    unet_config = dict(model.model.model_config.unet_config)
    mapping = diffusers_controlnet_keys(unet_config, sd)
    converted = {mapping[k]: v for k, v in sd.items() if k in mapping}
    leftover = sorted(k for k in sd if k not in mapping and not k.startswith(TRAINING_ONLY))
    if leftover:
        raise input_error(node, input_name, f"{name}: {len(leftover)} keys are not those of a ControlNet for this model (first: {leftover[0]})",
                          "connect the SD1.5 model this ControlNet was trained for, " + fix)
    unet_dtype = comfy.model_management.unet_dtype(model_params=-1, weight_dtype=comfy.utils.weight_dtype(converted))
    load_device = comfy.model_management.get_torch_device()
    manual_cast = comfy.model_management.unet_manual_cast(unet_dtype, load_device)
    unet_config.pop("out_channels", None)
    unet_config.update(operations=comfy.ops.pick_operations(unet_dtype, manual_cast), dtype=unet_dtype,
                       device=comfy.model_management.unet_offload_device(), hint_channels=converted["input_hint_block.0.weight"].shape[1])
    control_model = comfy.cldm.cldm.ControlNet(**unet_config)
    missing, unexpected = control_model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise input_error(node, input_name, f"{name} does not fit this model's ControlNet ({len(missing)} missing, {len(unexpected)} unexpected "
                          f"weights; first: {first})", "connect the SD1.5 model this ControlNet was trained for")
    return comfy.controlnet.ControlNet(control_model, load_device=load_device, manual_cast_dtype=manual_cast)


class PASDControlNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResPASDControlNetLoader",
            display_name=CONTROLNET_LOADER,
            category=category("PASD"),
            description="Loads PASD's ControlNet (controlnet/diffusion_pytorch_model.safetensors, diffusers layout) as ComfyUI's own "
                        "ControlNet for the connected model's architecture; apply it with Apply ControlNet (strength = PASD's "
                        "conditioning_scale, image = the upscaled low-res picture). Its to_rgbs heads only train the "
                        "degradation-removal block and are dropped; RRDB variants are refused.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5-family model the ControlNet is for (its architecture sizes the ControlNet)."),
                io.Combo.Input("control_net_name", options=folder_paths.get_filename_list("controlnet"),
                               tooltip="PASD's controlnet/diffusion_pytorch_model.safetensors (renamed, in models/controlnet)."),
            ],
            outputs=[io.ControlNet.Output(display_name="control_net")],
        )

    @classmethod
    def execute(cls, model, control_net_name) -> io.NodeOutput:
        sd15_unet(model, CONTROLNET_LOADER)
        fix = "download PASD's controlnet/diffusion_pytorch_model.safetensors (pasd or pasd_light) into models/controlnet"
        path = folder_paths.get_full_path("controlnet", control_net_name)
        if path is None or not path.endswith(".safetensors"):
            raise input_error(CONTROLNET_LOADER, "control_net_name", f"{control_net_name!r} is not a .safetensors file in models/controlnet", fix)
        shapes, read = read_safetensors(CONTROLNET_LOADER, "control_net_name", path, fix)
        return io.NodeOutput(controlnet_from_diffusers(model, {k: read(k) for k in shapes}, control_net_name))


# ---- the reference's recipe around sampling ---------------------------------------------------------

INIT_LATENT, COLOR_FIX = "PASD Init Latent", "PASD Color Fix"


class PASDInitLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResPASDInitLatent",
            display_name=INIT_LATENT,
            category=category("PASD"),
            description="PASD's init latent: the encoded upscaled input, noised as the reference does (to t=999, then once more to "
                        "t=added_noise_level). Equivalent in ComfyUI: the latent x sqrt(abar[added_noise_level]) (~0.119 for SD1.5 at "
                        "900), sampled at denoise 1.0 (KSampler adds the t=999 noise).",
            inputs=[
                io.Model.Input("model", tooltip="The model whose discrete schedule defines abar (SD1.5 family)."),
                io.Latent.Input("latent", tooltip="VAE Encode of the upscaled input (the same picture as the ControlNet image)."),
                io.Int.Input("added_noise_level", default=pasd.ADDED_NOISE_LEVEL, min=0, max=999,
                             tooltip="The reference's second noising timestep (pipeline_pasd: 900). Lower keeps more of the input."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="Feed to KSampler with denoise 1.0.")],
        )

    @classmethod
    def execute(cls, model, latent, added_noise_level) -> io.NodeOutput:
        sigmas = getattr(model.get_model_object("model_sampling"), "sigmas", None)
        if sigmas is None or len(sigmas) <= added_noise_level:
            raise input_error(INIT_LATENT, "model", "its sampling has no discrete 1000-step schedule",
                              "connect an SD1.5-family (eps, discrete) model")
        out = dict(latent)
        out["samples"] = latent["samples"] * pasd.init_latent_scale(sigmas, added_noise_level)
        return io.NodeOutput(out)


class PASDColorFix(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResPASDColorFix",
            display_name=COLOR_FIX,
            category=category("PASD"),
            description="PASD's wavelet colour fix after decode (always on in the reference): keeps the result's detail bands and "
                        "takes the low-frequency band (colour, shading) from the reference picture, the upscaled input.",
            inputs=[
                io.Image.Input("image", tooltip="The decoded PASD result."),
                io.Image.Input("reference", tooltip="The upscaled input (the ControlNet image); resized to the result if needed."),
                io.Int.Input("levels", default=5, min=1, max=8, tooltip="Wavelet levels (reference: 5): the low band is a blur of radius ~2^levels px."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, image, reference, levels) -> io.NodeOutput:
        if reference.shape[0] not in (1, image.shape[0]):
            raise input_error(COLOR_FIX, "reference", f"{reference.shape[0]} pictures for {image.shape[0]} results",
                              "give one reference, or one per result")
        result = image.movedim(-1, 1)[:, :3]
        ref = reference.movedim(-1, 1)[:, :3].to(result)
        if ref.shape[-2:] != result.shape[-2:]:
            ref = comfy.utils.common_upscale(ref, result.shape[-1], result.shape[-2], "bicubic", "disabled")
        fixed = pasd.wavelet_color_fix(result, ref.expand_as(result), levels)
        return io.NodeOutput(fixed.movedim(1, -1))


TILED = "PASD Tiled Sampling"
TILE_KEY = "ultrares.pasd.tiles"


def _controls(conds) -> list:
    """Every ControlNet in the conds of this call (each once, previous_controlnet chains included)."""
    found = []
    for cond in conds:
        for c in cond or []:
            if c.get("area") is not None or c.get("mask") is not None:
                raise input_error(TILED, "model", "a conditioning has an area or mask, which per-tile sampling does not crop",
                                  "remove the area/mask conditioning, or sample without PASD Tiled Sampling")
            control = c.get("control")
            while control is not None:
                if all(control is not f for f in found):
                    found.append(control)
                control = control.previous_controlnet
    return found


def tiled_cond_batch(tile: int, overlap: int):
    """CALC_COND_BATCH wrapper: above tile x tile latent px, each step runs the model (and its ControlNets)
    tile by tile: the latent cropped, and every ControlNet's hint cropped at the same place (x its
    compression ratio), the predictions blended with the reference's Gaussian weights."""

    def wrapper(executor, model, conds, x_in, timestep, model_options):
        h, w = x_in.shape[-2:]
        if h * w <= tile * tile:
            return executor(model, conds, x_in, timestep, model_options)
        size = min(tile, h, w)
        controls = _controls(conds)
        hints = [comfy.utils.common_upscale(c.cond_hint_original, w * c.compression_ratio, h * c.compression_ratio, c.upscale_algorithm, "center")
                 for c in controls]
        originals = [c.cond_hint_original for c in controls]
        weights = pasd.gaussian_weights(size, size).to(x_in)
        outs, total = None, torch.zeros((h, w), dtype=x_in.dtype, device=x_in.device)
        try:
            for y in pasd.tile_origins(h, size, overlap):
                for x in pasd.tile_origins(w, size, overlap):
                    for c, hint in zip(controls, hints):
                        r = c.compression_ratio
                        c.cond_hint_original, c.cond_hint = hint[..., y * r:(y + size) * r, x * r:(x + size) * r], None
                    part = executor(model, conds, x_in[..., y:y + size, x:x + size], timestep, model_options)
                    if outs is None:
                        outs = [torch.zeros_like(x_in) for _ in part]
                    for o, p in zip(outs, part):
                        o[..., y:y + size, x:x + size] += p * weights
                    total[y:y + size, x:x + size] += weights
        finally:
            for c, original in zip(controls, originals):
                c.cond_hint_original, c.cond_hint = original, None
        return [o / total for o in outs]

    return wrapper


class PASDTiledSampling(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResPASDTiledSampling",
            display_name=TILED,
            category=category("PASD"),
            description="PASD's per-step latent tiling on a clone of the model: when the latent has more than tile_size^2 pixels "
                        "(4K output = 512x512 latent px), every step runs the UNet and its ControlNet tile by tile, cropping the "
                        "ControlNet hint with the latent, and blends the predictions with the reference's Gaussian weights. "
                        "Smaller latents are sampled whole, as in the reference.",
            inputs=[
                io.Model.Input("model", tooltip="The PASD model (after PASD UNet Loader)."),
                io.Int.Input("tile_size", default=pasd.TILE_SIZE, min=16, max=1024, step=8,
                             tooltip="Tile side in latent px (reference: 320 = 2560 px). Tiling starts above tile_size^2 latent pixels."),
                io.Int.Input("tile_overlap", default=pasd.TILE_OVERLAP, min=0, max=256, step=1,
                             tooltip="Overlap of neighbouring tiles in latent px (reference: 8)."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, tile_size, tile_overlap) -> io.NodeOutput:
        if not 0 <= tile_overlap < tile_size:
            raise input_error(TILED, "tile_overlap", f"{tile_overlap} is not below tile_size {tile_size}", "use 8 (the reference)")
        m = model.clone()
        m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, TILE_KEY)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, TILE_KEY, tiled_cond_batch(tile_size, tile_overlap))
        return io.NodeOutput(m)


NODES = [PASDUNetLoader, PASDControlNetLoader, PASDInitLatent, PASDColorFix, PASDTiledSampling]
