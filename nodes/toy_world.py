"""The toy world: a tiny class-conditional diffusion model of our own, trained on 32x32 images that
each hold exactly one object. Sampled at 2x-4x it repeats objects, the failure every method of this
pack fixes, so each method can be measured on a CPU (tests/bench/repetition.py).

It is built from ComfyUI's own classes (an SD1.5-family model config, openaimodel.UNetModel, eps
prediction on the discrete scaled-linear schedule), so samplers, schedulers and our patches see the
same kind of model as SD1.5. It enters graphs like a checkpoint: MODEL, the conditioning of a chosen
shape, and a VAE. Its "latent" is the picture itself (RGB + luminance in [-1, 1]) and the VAE maps
one latent pixel to an 8x8 block, so image sizes are those of SD1.5 workflows (256 px = native).
"""

import pathlib

import comfy.latent_formats
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import safetensors.torch
import torch
from comfy_api.v0_0_2 import io

from .common import category, input_error

WEIGHTS = pathlib.Path(__file__).with_name("toy_world.safetensors")
SHAPES = ("disk", "square", "triangle")
NATIVE_LATENT_SIZE = 32  # trained at 32x32 latent pixels = 256x256 image pixels
CONTEXT_TOKENS, CONTEXT_DIM = 4, 32
# The sampling the toy world is measured with: stochastic, as the ScaleCrafter reference (DDIM eta 1).
# dpmpp_2m_sde draws its noise from a Brownian tree; euler_ancestral seeded like the initial noise
# (as KSampler seeds it) re-adds that noise at the first step and leaves this small model's pictures grainy.
SAMPLING = {"sampler_name": "dpmpp_2m_sde", "scheduler": "karras", "steps": 20, "cfg": 2.0}
EMBEDDINGS_KEY = "class_embeddings"  # (len(SHAPES) + 1, tokens, dim); the last row is the unconditional one

UNET = {
    "use_checkpoint": False, "image_size": NATIVE_LATENT_SIZE, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2, 2], "attention_resolutions": [4],
    "transformer_depth": 1, "context_dim": CONTEXT_DIM, "use_linear_in_transformer": False, "legacy": False,
    "use_spatial_transformer": True, "adm_in_channels": None, "use_temporal_attention": False,
    "use_temporal_resblock": False, "dtype": torch.float32,
}


class ToyWorldLatent(comfy.latent_formats.LatentFormat):
    """RGB + luminance at scale 1: the latent preview is the picture."""

    scale_factor = 1.0
    latent_channels = 4

    def __init__(self):
        self.latent_rgb_factors = [[0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0, 0, 0]]
        self.latent_rgb_factors_bias = [0.5, 0.5, 0.5]


class ToyWorldConfig(comfy.supported_models.SD15):
    """SD1.5 family (eps, discrete schedule, SD-style UNet), trained at 32 latent pixels."""

    unet_extra_config = {"num_heads": -1, "num_head_channels": 32}
    latent_format = ToyWorldLatent
    native_latent_size = NATIVE_LATENT_SIZE


def build_model(state_dict: dict | None = None) -> comfy.model_patcher.ModelPatcher:
    """The toy UNet as a ComfyUI model; weights from `state_dict` (diffusion_model keys) if given."""
    return model_of(ToyWorldConfig(comfy.model_detection.convert_config(dict(UNET))), state_dict)


def model_of(config, state_dict: dict | None = None) -> comfy.model_patcher.ModelPatcher:
    """A float32 ComfyUI model of a toy model config (the toy UNet, the toy StageC), weights from `state_dict`."""
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    if state_dict is not None:
        model.diffusion_model.load_state_dict(state_dict, strict=True)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    return (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3])


def to_latent(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the 4-channel toy latent."""
    return torch.cat([rgb, luminance(rgb)], dim=1)


class ToyWorldCodec(torch.nn.Module):
    """The toy VAE: decode = RGB channels, each latent pixel an 8x8 block; encode = 8x8 mean + luminance."""

    ratio = 8

    def __init__(self):
        super().__init__()
        self.toy_world_codec = torch.nn.Parameter(torch.ones(()), requires_grad=False)  # gives the patcher a device/dtype

    def decode(self, z, **_):
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=self.ratio, mode="nearest")

    def encode(self, x, **_):
        return to_latent(torch.nn.functional.avg_pool2d(x, self.ratio))


class CodecVAE(comfy.sd.VAE):
    """A comfy.sd.VAE over a small codec module of our own (decode/encode, `ratio` px per latent px), so
    VAE Decode / Encode (and their tiled forms) work unchanged."""

    def __init__(self, codec: torch.nn.Module, ratio: int, latent_channels: int = 4):
        super().__init__(sd={"pixel_space_vae": torch.tensor(1.0)})  # the host's identity VAE set-up path ...
        self.first_stage_model = codec.eval()  # ... with the codec as its model
        self.downscale_ratio = self.upscale_ratio = ratio
        self.latent_channels = latent_channels
        pixels = lambda shape: shape[2] * shape[3] * ratio ** 2 * 4
        self.memory_used_decode = lambda shape, dtype: pixels(shape) * comfy.model_management.dtype_size(dtype)
        self.memory_used_encode = lambda shape, dtype: shape[2] * shape[3] * 4 * comfy.model_management.dtype_size(dtype)
        self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device,
                                                        offload_device=comfy.model_management.vae_offload_device())
        self.size = None


class ToyWorldVAE(CodecVAE):
    """The toy codec as a VAE."""

    def __init__(self):
        super().__init__(ToyWorldCodec(), ToyWorldCodec.ratio)


def load_weights(path: pathlib.Path) -> tuple[dict, torch.Tensor]:
    """(diffusion_model state dict, class embeddings) from the shipped safetensors."""
    if not path.is_file():
        raise input_error(LOADER, "shape", f"the toy-world weights {path.name} are missing from {path.parent}",
                          "reinstall the pack, or train them with `.venv/bin/python tests/toy_world/train.py`")
    sd = safetensors.torch.load_file(str(path))
    return {k: v for k, v in sd.items() if k != EMBEDDINGS_KEY}, sd[EMBEDDINGS_KEY]


def conditioning(embeddings: torch.Tensor, index: int) -> list:
    return [[embeddings[index:index + 1].clone(), {}]]


LOADER = "Toy World Loader"


class ToyWorldLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResToyWorldLoader",
            display_name=LOADER,
            category=category("demo"),
            description=(
                "The pack's own tiny diffusion model (1.4M parameters, trained here on 32x32 pictures of one disk, square "
                "or triangle on a gradient). Native size 256x256 px; at 512-1024 px direct sampling repeats the object, "
                "which every UltraRes method should prevent. Swap it in for a checkpoint loader to try any workflow on a CPU."),
            inputs=[
                io.Combo.Input("shape", options=list(SHAPES), default=SHAPES[0],
                               tooltip="The object class the positive conditioning asks for."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The toy UNet (SD1.5 family, eps prediction, native 256 px)."),
                io.Conditioning.Output(display_name="positive", tooltip="Conditioning for the chosen shape."),
                io.Conditioning.Output(display_name="negative", tooltip="The unconditional embedding (for CFG)."),
                io.Vae.Output(display_name="VAE", tooltip="Toy VAE: one latent pixel is an 8x8 block of the image."),
            ],
        )

    @classmethod
    def execute(cls, shape) -> io.NodeOutput:
        if shape not in SHAPES:
            raise input_error(LOADER, "shape", f"unknown shape {shape!r}", f"choose one of {', '.join(SHAPES)}")
        unet, embeddings = _cached_weights()
        return io.NodeOutput(build_model(unet), conditioning(embeddings, SHAPES.index(shape)),
                             conditioning(embeddings, len(SHAPES)), ToyWorldVAE())


_CACHE = {}


def _cached_weights():
    """Read the file once per process; every call still builds a fresh model from it."""
    key = (WEIGHTS, WEIGHTS.stat().st_mtime if WEIGHTS.is_file() else None)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load_weights(WEIGHTS)
    return _CACHE[key]


NODES = [ToyWorldLoader]
