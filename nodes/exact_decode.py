"""Exact Tiled VAE Decode: tile-by-tile decode that equals the full decode (no seams), for the
AutoencoderKL VAEs of SD1.x/2.x, SDXL, SD3 and FLUX. Mechanics in patches/exact_decode.py."""

import torch
from comfy_api.v0_0_2 import io

import comfy.model_management
import comfy.utils
from comfy.ldm.models.autoencoder import AutoencodingEngine, AutoencodingEngineLegacy
from comfy.ldm.modules.diffusionmodules import model as sd_vae

from ..patches import exact_decode as exact
from .common import category, input_error

NODE = "Exact Tiled VAE Decode"
STATES = ["auto", "vae device", "cpu"]


def _is_sd_decoder(decoder) -> bool:
    """Exactly comfy's Decoder made of its ResnetBlocks and Upsamples (subclasses such as the temporal
    VideoDecoder compute differently)."""
    if type(decoder) is not sd_vae.Decoder:
        return False
    blocks = [decoder.mid.block_1, decoder.mid.block_2] + [b for up in decoder.up for b in up.block]
    upsamples = [up.upsample for up in list(decoder.up)[1:]]
    attentions = [decoder.mid.attn_1] + [a for up in decoder.up for a in up.attn]
    return (all(type(b) is sd_vae.ResnetBlock for b in blocks) and all(type(u) is sd_vae.Upsample for u in upsamples)
            and all(type(a) is sd_vae.AttnBlock for a in attentions))


def decoder_parts(vae):
    """(decoder, latent -> decoder input, latent channels) for the AutoencoderKL layouts decoded exactly."""
    model = vae.first_stage_model
    decoder = getattr(model, "decoder", None)
    if type(model) is AutoencodingEngine and _is_sd_decoder(decoder):  # FLUX, SD3: no post-quant conv
        return decoder, (lambda z: z), decoder.conv_in.in_channels
    if isinstance(model, AutoencodingEngineLegacy) and model.bn is None and _is_sd_decoder(decoder):  # SD1.x/2.x, SDXL
        return decoder, model.post_quant_conv, model.post_quant_conv.in_channels
    raise input_error(NODE, "vae", f"{type(model).__name__} is not an image AutoencoderKL (SD1.x/2.x, SDXL, SD3, FLUX VAE)",
                      "use the stock VAE Decode (Tiled) for this VAE")


class ExactVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResExactVAEDecode",
            display_name=NODE,
            category=category("VAE"),
            description="Decodes latents tile by tile with the overlap every layer needs and whole-image GroupNorm "
                        "statistics, so the image equals a full VAE Decode (no seams, unlike VAE Decode (Tiled)) while "
                        "only tiles go to the GPU: the layer tensors can wait in RAM. For the SD1.x/2.x, SDXL, SD3 and FLUX VAEs.",
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to decode (images, not video)."),
                io.Vae.Input("vae", tooltip="An AutoencoderKL VAE: SD1.x/2.x, SDXL, SD3 or FLUX (ae.safetensors)."),
                io.Int.Input("tile_size", default=512, min=64, max=8192, step=32,
                             tooltip="Tile edge in output pixels. Smaller tiles use less memory and cost a little more time; "
                                     "the result does not depend on it."),
                io.Combo.Input("layer_memory", options=STATES, default="auto",
                               tooltip="Where the whole-image layer tensors live between tiles. 'vae device' is fastest; 'cpu' "
                                       "keeps them in RAM (about 0.4 GB per megapixel in bf16) and GPU memory to one tile's "
                                       "working set whatever the image size (under 1 GB at tile 512); 'auto' picks the VAE "
                                       "device when they fit there, else RAM."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, samples, vae, tile_size, layer_memory) -> io.NodeOutput:
        vae.throw_exception_if_invalid()
        decoder, prepare, expected = decoder_parts(vae)
        latent = samples["samples"]
        if getattr(latent, "is_nested", False) or latent.ndim != 4:
            raise input_error(NODE, "samples", f"latent of shape {tuple(latent.shape)} is not an image latent [B, C, h, w]",
                              "decode video or nested latents with the stock VAE Decode")
        if latent.shape[1] != expected:
            raise input_error(NODE, "samples", f"the latent has {latent.shape[1]} channels, this VAE decodes {expected}",
                              "use the VAE that belongs to the model that made the latent")
        if layer_memory not in STATES:
            raise input_error(NODE, "layer_memory", f"unknown choice {layer_memory!r}", f"pick one of {STATES}")

        plan = exact.plan(decoder, (1, expected) + tuple(latent.shape[2:]), tile_size, vae.vae_dtype)
        on_device = layer_memory == "vae device" or vae.device.type == "cpu"
        comfy.model_management.load_models_gpu([vae.patcher], memory_required=plan.tile_bytes + (plan.state_bytes if on_device else 0),
                                               force_full_load=vae.disable_offload)
        if layer_memory == "auto" and not on_device:
            on_device = comfy.model_management.get_free_memory(vae.device) > 1.2 * (plan.tile_bytes + plan.state_bytes)
        host = comfy.model_management.intermediate_device() if layer_memory == "auto" else torch.device("cpu")
        placement = exact.Placement(vae.device, vae.device if on_device else host)

        batch = latent.shape[0]
        progress = comfy.utils.ProgressBar(batch * plan.tiles)

        def on_tile():
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update(1)

        images = None
        for i in range(batch):  # one image at a time: GroupNorm statistics are per image anyway
            with torch.no_grad():
                z = prepare(latent[i:i + 1].to(device=vae.device, dtype=vae.vae_dtype))
                try:
                    decoded = exact.exact_decode(decoder, z, tile_size, placement, on_tile)
                except exact.UnsupportedDecoder as e:
                    raise input_error(NODE, "vae", str(e), "use the stock VAE Decode (Tiled) for this VAE") from None
                image = vae.process_output(decoded.to(vae.output_device).float()).movedim(1, -1)
            if images is None:
                images = torch.empty((batch,) + tuple(image.shape[1:]), device=vae.output_device)
            images[i] = image[0]
        return io.NodeOutput(images)


NODES = [ExactVAEDecode]
