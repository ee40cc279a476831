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


def flux_host_config(dit_config: dict) -> dict:
    """FLUX_DIT as this host's Flux class takes it: newer hosts (0.8.0, with FLUX.2) require `txt_ids_dims`,
    the text ids' position axes, which the checkpoint detection sets to none for FLUX.1; 0.3.75 has no such field."""
    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return dict(dit_config, txt_ids_dims=[]) if "txt_ids_dims" in fields and "txt_ids_dims" not in dit_config else dit_config


def _build(config_class, unet_config, seed):
    if "channel_mult" in unet_config:  # UNet configs come in the compact form; DiT configs are used as they are
        unet_config = comfy.model_detection.convert_config(dict(unet_config))
    elif unet_config.get("image_model") == "flux":
        unet_config = flux_host_config(unet_config)
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


# Stable Cascade at test size: ComfyUI's StageC / StageB classes through their model configs.
STAGE_C = {
    "stable_cascade_stage": "c", "c_in": 16, "c_out": 16, "c_r": 64, "patch_size": 1, "c_cond": 32,
    "c_hidden": [32, 32], "nhead": [1, 1], "blocks": [[1, 1], [1, 1]], "block_repeat": [[1, 1], [1, 1]],
    "level_config": ["CTA", "CTA"], "c_clip_text": 32, "c_clip_text_pooled": 32, "c_clip_img": 768, "c_clip_seq": 4,
    "switch_level": [False],
}
STAGE_B = {
    "stable_cascade_stage": "b", "c_in": 4, "c_out": 4, "c_r": 64, "patch_size": 4, "c_cond": 32, "c_hidden": [8, 16, 16, 16],
    "nhead": [-1, -1, 1, 1], "blocks": [[1, 1, 1, 1], [1, 1, 1, 1]], "block_repeat": [[1, 1, 1, 1], [1, 1, 1, 1]],
    "level_config": ["CT", "CT", "CTA", "CTA"], "c_clip": 32, "c_clip_seq": 4, "c_effnet": 16, "c_pixels": 3,
}


def tiny_stage_c(seed: int = 0, **overrides):
    """Stable Cascade StageC (the 16-channel prior), two 'CTA' levels of width 32, text width 32."""
    return _build(comfy.supported_models.Stable_Cascade_C, dict(STAGE_C, **overrides), seed)


def tiny_stage_b(seed: int = 0, **overrides):
    """Stable Cascade StageB (4-channel latent at 1/4 of the picture), conditioned on a 16-channel StageC latent."""
    return _build(comfy.supported_models.Stable_Cascade_B, dict(STAGE_B, **overrides), seed)


def cascade_conditioning(seed: int = 0, width: int = STAGE_C["c_clip_text"]) -> list:
    """Conditioning of the Stable Cascade text encoder's shape at the tiny width (tokens + pooled)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 8, width, generator=g), {"pooled_output": torch.randn(1, 1, width, generator=g)}]]


def ultrapixel_state_dict(ind: int = STAGE_C["c_hidden"][0], ch: int = 32, tokens: int = 1024, seed: int = 5,
                          prefix: str = "module.") -> dict:
    """ultrapixel_t2i's released layout (module.64.j / module.65.j, hr_norm.alpha/gamma included) at tiny widths:
    `ind` StageC channels, `ch` token width, `tokens` position-embedding rows. Layer shapes as in the release
    (research notes 1.7), written out here independently of the pack's code."""
    g = torch.Generator().manual_seed(seed)
    groups = min(64, ch)
    shapes = released_transinr_shapes(ind, ch, tokens, groups)
    sd = {}
    for group in ("64", "65"):
        for j in ("0", "1"):
            for name, shape in shapes.items():
                scale = 1 / math.sqrt(shape[-1] if len(shape) > 1 else 1)
                sd[f"{prefix}{group}.{j}.{name}"] = torch.randn(shape, generator=g) * (scale if len(shape) > 1 else 0.02)
    return sd


def released_transinr_shapes(ind: int = 2048, ch: int = 1024, tokens: int = 1024, groups: int = 64) -> dict:
    """Every tensor of one released TransInr and its shape (full size by default: 26.38M parameters)."""
    pe = 256
    return {
        "input_layer.weight": (ch, ind, 1, 1), "input_layer.bias": (ch,),
        "tokenizer.prefc.weight": (ch, ch), "tokenizer.prefc.bias": (ch,), "tokenizer.posemb": (tokens, ch),
        "transformer_encoder.layers.0.0.norm.weight": (ch,), "transformer_encoder.layers.0.0.norm.bias": (ch,),
        "transformer_encoder.layers.0.0.fn.to_q.1.weight": (ch, ch), "transformer_encoder.layers.0.0.fn.to_q.1.bias": (ch,),
        "transformer_encoder.layers.0.0.fn.to_kv.1.weight": (2 * ch, ch), "transformer_encoder.layers.0.0.fn.to_kv.1.bias": (2 * ch,),
        "transformer_encoder.layers.0.1.norm.weight": (ch,), "transformer_encoder.layers.0.1.norm.bias": (ch,),
        "transformer_encoder.layers.0.1.fn.net.0.weight": (ch, ch), "transformer_encoder.layers.0.1.fn.net.0.bias": (ch,),
        "transformer_encoder.layers.0.1.fn.net.3.weight": (ch, ch), "transformer_encoder.layers.0.1.fn.net.3.bias": (ch,),
        "base_params.wb0": (pe + 1, ch), "base_params.wb1": (ch + 1, ch),
        "wtoken_postfc.wb0.0.weight": (ch,), "wtoken_postfc.wb0.0.bias": (ch,),
        "wtoken_postfc.wb0.1.weight": (pe, ch), "wtoken_postfc.wb0.1.bias": (pe,),
        "wtoken_postfc.wb1.0.weight": (ch,), "wtoken_postfc.wb1.0.bias": (ch,),
        "wtoken_postfc.wb1.1.weight": (ch, ch), "wtoken_postfc.wb1.1.bias": (ch,),
        "wtokens": (2 * groups, ch),
        "output_layer.weight": (ind, ch, 1, 1), "output_layer.bias": (ind,),
        "mapp_t.mapper.weight": (2 * ind, 64), "mapp_t.mapper.bias": (2 * ind,),
        "hr_norm.mapping.mapper.weight": (2 * ind, 64), "hr_norm.mapping.mapper.bias": (2 * ind,),
        "hr_norm.alpha.weight": (ind, ind, 1, 1), "hr_norm.alpha.bias": (ind,),
        "hr_norm.gamma.weight": (ind, ind, 1, 1), "hr_norm.gamma.bias": (ind,),
        "toout.0.weight": (ind // 4, 2 * ind), "toout.0.bias": (ind // 4,),
        "toout.2.weight": (ind, ind // 4), "toout.2.bias": (ind,),
    }


def tiny_stage_a(seed: int = 0):
    """ComfyUI's StageA class (Stable Cascade's VQGAN, 4x) at width 16, as a VAE (the stock loader builds
    only the full-size one)."""
    from comfy.ldm.cascade.stage_a import StageA
    from ultrares.nodes.toy_world import CodecVAE

    codec = init_parameters(StageA(levels=2, bottleneck_blocks=1, c_hidden=16, c_latent=4, codebook_size=16), seed)
    return CodecVAE(codec, ratio=4)
