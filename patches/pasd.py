"""PASD (pixel-aware stable diffusion, yangxy/PASD) on an SD1.5-family UNet: the released key layouts
of its pixel-aware cross-attention (PACA), the decoder geometry they must fit, and the PACA
computations, as pure torch.

Two released variants (read from the keys, never from a file name):
- full PASD: a whole transformer `up_blocks.i.pixel_attentions.j` after every decoder layer (after the
  ResBlock, or after the text transformer where there is one; before the upsampler);
- PASD-light: `proj_in_plus` / `norm2_plus` / `attn2_plus` inside the decoder's text transformers.
Both attend from the decoder state (query) to the ControlNet residual of the same skip (keys/values).
"""

import re
from dataclasses import dataclass

import torch

FULL, LIGHT = "PASD", "PASD-light"
HEADS = 8  # the reference's attention_head_dim 8 (diffusers: number of heads) for every PACA attention

_FULL_KEY = re.compile(r"^up_blocks\.(\d+)\.pixel_attentions\.(\d+)\.(.+)$")
_LIGHT_KEY = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.((?:proj_in_plus|transformer_blocks\.\d+\.(?:norm2_plus|attn2_plus))\..+)$")


@dataclass(frozen=True)
class DecoderLayer:
    """One ComfyUI output block: its index, diffusers (up block, layer), query and skip channels."""

    index: int
    up_block: int
    layer: int
    channels: int
    skip_channels: int


def decoder_layout(model_channels: int, channel_mult, num_res_blocks) -> list[DecoderLayer]:
    """The output blocks of an openaimodel UNet in order, with the channels of their result (the
    PACA query) and of the skip they concatenate (the ControlNet residual that is PACA's key/value)."""
    if isinstance(num_res_blocks, int):
        num_res_blocks = [num_res_blocks] * len(channel_mult)
    skips = [model_channels]
    for level, mult in enumerate(channel_mult):
        skips += [model_channels * mult] * num_res_blocks[level]
        if level != len(channel_mult) - 1:
            skips.append(model_channels * mult)  # the downsampler's output is a skip too
    layers = []
    for up_block, level in enumerate(reversed(range(len(channel_mult)))):
        for layer in range(num_res_blocks[level] + 1):
            layers.append(DecoderLayer(len(layers), up_block, layer, model_channels * channel_mult[level], skips.pop()))
    return layers


def full_layer_shapes(c: int, cs: int) -> dict[str, tuple]:
    """Key suffix -> shape of one full-PASD PACA transformer (diffusers Transformer2DModel, depth 1,
    conv projections; the same names as ComfyUI's SpatialTransformer)."""
    shapes = {"norm.weight": (c,), "norm.bias": (c,), "proj_in.weight": (c, c, 1, 1), "proj_in.bias": (c,),
              "proj_out.weight": (c, c, 1, 1), "proj_out.bias": (c,)}
    block = "transformer_blocks.0."
    for norm in ("norm1", "norm2", "norm3"):
        shapes[f"{block}{norm}.weight"] = shapes[f"{block}{norm}.bias"] = (c,)
    for attn, kv in (("attn1", c), ("attn2", cs)):
        shapes.update({f"{block}{attn}.to_q.weight": (c, c), f"{block}{attn}.to_k.weight": (c, kv),
                       f"{block}{attn}.to_v.weight": (c, kv), f"{block}{attn}.to_out.0.weight": (c, c),
                       f"{block}{attn}.to_out.0.bias": (c,)})
    shapes.update({f"{block}ff.net.0.proj.weight": (8 * c, c), f"{block}ff.net.0.proj.bias": (8 * c,),
                   f"{block}ff.net.2.weight": (c, 4 * c), f"{block}ff.net.2.bias": (c,)})
    return shapes


def light_layer_shapes(c: int, cs: int, depth: int = 1) -> dict[str, tuple]:
    """Key suffix -> shape of the PASD-light additions to one text transformer of `depth` blocks."""
    shapes = {"proj_in_plus.weight": (cs, cs, 1, 1), "proj_in_plus.bias": (cs,)}
    for d in range(depth):
        block = f"transformer_blocks.{d}."
        shapes.update({f"{block}norm2_plus.weight": (c,), f"{block}norm2_plus.bias": (c,),
                       f"{block}attn2_plus.to_q.weight": (c, c), f"{block}attn2_plus.to_k.weight": (c, cs),
                       f"{block}attn2_plus.to_v.weight": (c, cs), f"{block}attn2_plus.to_out.0.weight": (c, c),
                       f"{block}attn2_plus.to_out.0.bias": (c,)})
    return shapes


def released_keys(variant: str, layers: list[DecoderLayer], light_depth: dict[int, int] | None = None) -> dict[str, tuple]:
    """Every PACA key of a released file for this decoder, with its shape. PASD-light covers the layers
    named in `light_depth` (output block -> transformer depth: those with a text transformer)."""
    out = {}
    for layer in layers:
        if variant == FULL:
            prefix, shapes = f"up_blocks.{layer.up_block}.pixel_attentions.{layer.layer}.", full_layer_shapes(layer.channels, layer.skip_channels)
        elif layer.index in (light_depth or {}):
            prefix = f"up_blocks.{layer.up_block}.attentions.{layer.layer}."
            shapes = light_layer_shapes(layer.channels, layer.skip_channels, light_depth[layer.index])
        else:
            continue
        out.update({prefix + k: v for k, v in shapes.items()})
    return out


class PASDFileError(ValueError):
    """The file is not a PASD UNet that fits the model; the message says what it is instead."""


def detect_variant(keys) -> str:
    """FULL or LIGHT from the key names; a clear error for the files people mistake for it."""
    keys = list(keys)
    full = any(_FULL_KEY.match(k) for k in keys)
    light = any(_LIGHT_KEY.match(k) for k in keys)
    if full and light:
        raise PASDFileError("it holds both full-PASD (pixel_attentions) and PASD-light (attn2_plus) keys")
    if full:
        return FULL
    if light:
        return LIGHT
    if any("lora" in k.lower() or k.endswith(".alpha") for k in keys):
        raise PASDFileError("it is a LoRA (lora_* keys), not a PASD UNet")
    if any(k.startswith("controlnet_") for k in keys):
        raise PASDFileError("it is a ControlNet (controlnet_* keys); load it with PASD ControlNet Loader")
    if any(k.startswith(("add_embedding.", "label_emb.", "model.diffusion_model.label_emb.", "conditioner.")) for k in keys):
        raise PASDFileError("it is an SDXL UNet/checkpoint; PASD here is for SD1.5 (PASD-SDXL is not supported)")
    raise PASDFileError("it has no PACA keys (up_blocks.<i>.pixel_attentions.* or ...attn2_plus.*): "
                        "a plain UNet or checkpoint, not PASD's unet/diffusion_pytorch_model.safetensors")


def paca_keys(keys, variant: str) -> list[str]:
    pattern = _FULL_KEY if variant == FULL else _LIGHT_KEY
    return [k for k in keys if pattern.match(k)]


def check_shapes(shapes: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """The file's PACA keys (key -> shape) against what the model's decoder needs."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if tuple(shapes[k]) != tuple(expected[k]))
    if wrong:
        k = wrong[0]
        raise PASDFileError(f"{len(wrong)} PACA weights do not fit this model's decoder (first: {k} is "
                            f"{list(shapes[k])}, the model needs {list(expected[k])}): PASD for another base architecture")
    if unexpected:
        raise PASDFileError(f"{len(unexpected)} PACA keys name decoder layers this model does not have (first: {unexpected[0]})")
    if missing:
        raise PASDFileError(f"{len(missing)} PACA weights are missing (first: {missing[0]}): an incomplete or truncated file")


def layer_state_dicts(tensors: dict[str, torch.Tensor], variant: str, layers: list[DecoderLayer]) -> dict[int, dict[str, torch.Tensor]]:
    """Output block index -> that layer's PACA state dict (key suffixes as in full/light_layer_shapes)."""
    by_position = {(l.up_block, l.layer): l.index for l in layers}
    pattern = _FULL_KEY if variant == FULL else _LIGHT_KEY
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = pattern.match(key)
        if match:
            up_block, layer, suffix = int(match[1]), int(match[2]), match[3]
            out.setdefault(by_position[(up_block, layer)], {})[suffix] = value
    return out


def control_index(control_count: int, output_block: int) -> int:
    """Which entry of ComfyUI's control['output'] (input-block order, popped from the end by the UNet)
    is added to the skip of `output_block`."""
    return control_count - 1 - output_block


def tokens(x: torch.Tensor) -> torch.Tensor:
    """b c h w -> b (h w) c."""
    return x.flatten(2).transpose(1, 2)


ADDED_NOISE_LEVEL = 900  # the reference's second noising of the init latent (pipeline_pasd: added_noise_level)


def init_latent_scale(sigmas: torch.Tensor, added_noise_level: int = ADDED_NOISE_LEVEL) -> float:
    """The reference's init latent is z noised to t = 999 and then once more to t = `added_noise_level`:
    sqrt(abar_900) sqrt(abar_999) z + noise of variance 1 - abar_900 abar_999. Sampling from sigma_max a
    latent of sqrt(abar_900) z gives the same signal and (up to 1 - abar_999, ~0.995 vs ~0.99995) noise.
    `sigmas` is the discrete schedule (sigma_t = sqrt((1 - abar_t) / abar_t))."""
    return float(1 / torch.sqrt(1 + sigmas[added_noise_level].double() ** 2))


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """3x3 binomial blur dilated by `radius`, edge-replicated (one level of the a-trous wavelet transform)."""
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype, device=x.device) / 16
    c = x.shape[1]
    x = torch.nn.functional.pad(x, (radius,) * 4, mode="replicate")
    return torch.nn.functional.conv2d(x, k.expand(c, 1, 3, 3), groups=c, dilation=radius)


def wavelet_bands(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) frequency parts of (B, C, H, W) pictures: high = sum of `levels` wavelet details, x = high + low."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2 ** i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet_color_fix(result: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The reference's wavelet colour fix (after decode): the result's detail bands on the reference's
    low-frequency band (colour and shading of the input), both (B, C, H, W) of one size."""
    return (wavelet_bands(result, levels)[0] + wavelet_bands(reference, levels)[1]).clamp(0, 1)


TILE_SIZE, TILE_OVERLAP = 320, 8  # the reference's latent_tiled_size / latent_tiled_overlap (latent px)


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one side as the reference lays them: every tile - overlap px, the last one flush
    with the end."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def gaussian_weights(height: int, width: int) -> torch.Tensor:
    """The reference's blending weights for one tile: a separable Gaussian of variance 0.01 on coordinates
    normalised by the tile side, centred on the tile."""
    def axis(n):
        x = torch.arange(n, dtype=torch.float64)
        return torch.exp(-((x - (n - 1) / 2) ** 2) / (n * n) / (2 * 0.01)) / (2 * torch.pi * 0.01) ** 0.5
    return (axis(height)[:, None] * axis(width)[None]).float()
