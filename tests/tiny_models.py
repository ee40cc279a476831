"""Tiny models of the real families, built through ComfyUI's own classes (model configs, UNetModel,
Flux DiT, ModelPatcher). ComfyUI's ops leave weights uninitialised, so every parameter is set here
from a seed: the same call always builds the same model."""

import dataclasses
import math

import torch

import comfy.ldm.flux.model
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models


def init_parameters(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Deterministic, well-scaled init: fan-in normal for weights, ones for norm scales, small biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", ".scale")) or ".norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return module


def patcher(model) -> comfy.model_patcher.ModelPatcher:
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=comfy.model_management.unet_offload_device())


SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": 1, "channel_mult": [1, 2, 2], "attention_resolutions": [4], "transformer_depth": 1,
    "num_head_channels": 32, "context_dim": 768, "use_linear_in_transformer": False, "legacy": False,
    "use_spatial_transformer": True, "adm_in_channels": None, "use_temporal_attention": False,
    "use_temporal_resblock": False, "dtype": torch.float32,
}

SDXL_UNET = dict(
    SD15_UNET, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
    num_classes="sequential", channel_mult=[1, 2, 4], attention_resolutions=[2, 4],
)

FLUX_DIT = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 32,
    "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
    "guidance_embed": True,
}


def _flux_host_config(dit_config: dict) -> dict:
    """FLUX_DIT as this host's Flux class takes it: newer hosts (0.8.0, with FLUX.2) require `txt_ids_dims`,
    the text ids' position axes, which the checkpoint detection sets to none for FLUX.1; 0.3.75 has no such field."""
    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return dict(dit_config, txt_ids_dims=[]) if "txt_ids_dims" in fields and "txt_ids_dims" not in dit_config else dit_config


def _build(config_class, unet_config, seed):
    if "channel_mult" in unet_config:  # UNet configs come in the compact form; DiT configs are used as they are
        unet_config = comfy.model_detection.convert_config(dict(unet_config))
    elif unet_config.get("image_model") == "flux":
        unet_config = _flux_host_config(unet_config)
    model_config = config_class(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    init_parameters(model.diffusion_model, seed)
    return patcher(model)


def tiny_sd15(seed: int = 0, **overrides):
    """SD1.5-family UNet (SD15 model config, eps prediction, 4 latent channels, context 768)."""
    return _build(comfy.supported_models.SD15, dict(SD15_UNET, **overrides), seed)


class TinySD20(comfy.supported_models.SD20):
    """SD20 with attention heads the tiny width can hold (SD20 itself fixes 64 channels per head)."""

    unet_extra_config = {"num_heads": -1, "num_head_channels": 32}


def tiny_sd21(seed: int = 0, **overrides):
    """SD2.x-family UNet (an SD20 model config, context 1024, linear transformer projections), 4 levels."""
    return _build(TinySD20, dict(SD15_UNET, context_dim=1024, use_linear_in_transformer=True,
                                                    channel_mult=[1, 1, 1, 1], attention_resolutions=[4, 8], **overrides), seed)


def tiny_sdxl(seed: int = 0, **overrides):
    """SDXL-family UNet: adm (pooled text + size/crop embedding, 2816) and context 2048, 3 levels."""
    return _build(comfy.supported_models.SDXL, dict(SDXL_UNET, **overrides), seed)


def tiny_flux(seed: int = 0, **overrides):
    """Flux-family DiT (dev-style, guidance embedding), one double and one single block."""
    return _build(comfy.supported_models.Flux, dict(FLUX_DIT, **overrides), seed)


def write_tiny_sd15_checkpoint(path, seed: int = 0) -> None:
    """The smallest checkpoint ComfyUI's loaders detect as SD1.5 (model_channels 320, context 768:
    one level, one res block, one transformer block, in the input level; ~17M params), with a TAESD-layout VAE so
    CheckpointLoaderSimple also yields a VAE. No text encoder: conditioning comes from elsewhere."""
    import comfy.taesd.taesd
    import safetensors.torch

    config = comfy.model_detection.convert_config(dict(SD15_UNET, model_channels=320, channel_mult=[1], attention_resolutions=[1], num_head_channels=64))
    config.update(transformer_depth_output=[0, 0], transformer_depth_middle=0)
    unet = _build(comfy.supported_models.SD15, config, seed)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.model.diffusion_model.state_dict().items()}
    vae = init_parameters(comfy.taesd.taesd.TAESD(latent_channels=4), seed + 1)
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    # fp8 UNet weights keep the file under 30 MB and exercise ComfyUI's weight-casting path.
    dtype = lambda k: torch.float8_e4m3fn if k.startswith("model.") and sd[k].ndim >= 2 else torch.float16
    safetensors.torch.save_file({k: v.to(dtype(k)).contiguous() for k, v in sd.items()}, str(path))


TINY_VAE = {
    "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
}


def tiny_vae(seed: int = 0, **overrides):
    """SD-layout AutoencoderKL VAE (8x, post-quant conv, GroupNorm(32) on 32/64 channels) as a comfy.sd.VAE,
    built through the VAE's config path. Norm scales are perturbed so GroupNorm's affine part matters."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    import comfy.sd

    ddconfig = dict(TINY_VAE, **overrides)
    params = {"embed_dim": ddconfig["z_channels"], "ddconfig": ddconfig}
    model = init_parameters(AutoencoderKL(**params), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in name and p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return comfy.sd.VAE(sd=model.state_dict(), config={"params": params})


def write_tiny_taesd_vae(path, latent_channels: int = 16, seed: int = 0) -> None:
    """A TAESD-layout VAE file (ComfyUI's VAE loader detects it by its keys), e.g. a stand-in for
    FLUX's ae.safetensors with 16 latent channels: ~2M parameters, so decoding costs nothing."""
    import comfy.taesd.taesd
    import safetensors.torch

    vae = init_parameters(comfy.taesd.taesd.TAESD(latent_channels=latent_channels), seed)
    safetensors.torch.save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))


URAE_RANK = 16


def urae_2k_adapter(seed: int = 3, hidden: int = FLUX_DIT["hidden_size"]) -> dict:
    """URAE's released 2K layout (PEFT LoRA r16 on the image-stream attention), at tiny_flux's shapes."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    modules = [f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
    modules += [f"single_transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")]
    for m in modules:
        sd[f"transformer.{m}.lora_A.weight"] = torch.randn(URAE_RANK, hidden, generator=g) * 0.1
        sd[f"transformer.{m}.lora_B.weight"] = torch.randn(hidden, URAE_RANK, generator=g) * 0.1
    return sd


def urae_4k_adapter(seed: int = 4, hidden: int = FLUX_DIT["hidden_size"]) -> dict:
    """URAE's 4K minor-component adapter layout (processor.to_q_a / to_q_b ...), at tiny_flux's shapes."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for block, projections in (("transformer_blocks.0", ("to_q", "to_k", "to_v", "to_out")), ("single_transformer_blocks.0", ("to_q", "to_k", "to_v"))):
        for p in projections:
            sd[f"{block}.attn.processor.{p}_a.weight"] = torch.randn(URAE_RANK, hidden, generator=g) * 0.1
            sd[f"{block}.attn.processor.{p}_b.weight"] = torch.randn(hidden, URAE_RANK, generator=g) * 0.1
    return sd


# ---- PASD files in the released layouts, for any SD1.5-family model's shapes -----------------------

def pasd_unet_file(model, variant="PASD", seed=0, only=None, zero=False) -> dict:
    """Released-layout PACA keys for `model`'s decoder; random weights (or zeros), on `only` layers nonzero."""
    from ultrares.nodes import pasd as pasd_nodes
    from ultrares.patches import pasd

    unet = model.model.diffusion_model
    layers = pasd_nodes.decoder_of(model)
    keys = pasd.released_keys(variant, layers, pasd_nodes.text_transformer_depths(unet))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in keys.items():
        position = k.split(".")[1], k.split(".")[3]
        index = next(l.index for l in layers if (str(l.up_block), str(l.layer)) == position)
        value = torch.randn(shape, generator=g) / (shape[1] ** 0.5 if len(shape) > 1 else 50) + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
        if zero or (only is not None and index not in only and (k.endswith("proj_out.weight") or k.endswith("proj_out.bias") or "to_out" in k)):
            value = torch.zeros(shape)  # a layer whose output projection is zero adds nothing
        out[k] = value
    return out


def pasd_controlnet_file(model, seed=1) -> dict:
    """A random ControlNet for `model` in PASD's diffusers layout (zero convs non-zero, so residuals matter)."""
    import comfy.cldm.cldm
    from ultrares.nodes import pasd as pasd_nodes

    config = dict(model.model.model_config.unet_config)
    config.pop("out_channels")
    net = init_parameters(comfy.cldm.cldm.ControlNet(**config, hint_channels=3), seed)
    sd = pasd_nodes.controlnet_to_diffusers(config, net.state_dict())
    sd["controlnet_cond_embedding.to_rgbs.0.weight"] = torch.zeros(3, 32, 3, 3)
    return sd


def released_vae(family: str):
    """The SDXL or FLUX VAE in its released layout (4 levels, 128-512 channels, 8x) as a comfy.sd.VAE, built
    by ComfyUI's own detection from the keys that decide it; weights uninitialised (init_parameters or
    `.to("meta")` for shapes only)."""
    import comfy.sd

    channels = {"sdxl": 4, "flux": 16}[family]
    keys = {"decoder.conv_in.weight": torch.zeros(512, channels, 3, 3),
            "decoder.up.3.upsample.conv.weight": torch.zeros(512, 512, 3, 3)}  # 4 levels, not the x4 upscaler's 3
    if family == "sdxl":
        keys["post_quant_conv.weight"] = torch.zeros(channels, channels, 1, 1)
    return comfy.sd.VAE(sd=keys)
