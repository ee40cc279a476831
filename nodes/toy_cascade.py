"""The toy StageC: ComfyUI's own Stable Cascade StageC class at a tiny width, trained on the toy
world's pictures (tests/toy_world/train_cascade.py), with UltraPixel guidance modules trained for it
in the released layout (module.64.j / module.65.j). It shows UltraPixel working on a CPU
(tests/bench/ultrapixel_toy.py): sampled at 4x, the plain StageC repeats the object (0.91 of 33 seeds);
guided by its own native-size pass, 0.03 (docs/ultrapixel.md, "Twelfth look").

Its latent is the toy world's picture (4 channels, the toy VAE: one latent px = 8x8 px); StageC
patch size 2, so the StageC grid is 16x16 at the native 32x32 latent (UltraPixel's LR grid is 24x24
on the real model; the scale embedding and size tiers are taken relative to the native grid).
"""

import pathlib

import safetensors.torch
import torch

import comfy.model_patcher
import comfy.supported_models

from . import toy_world

WEIGHTS = pathlib.Path(__file__).with_name("toy_cascade.safetensors")
ULTRAPIXEL_WEIGHTS = pathlib.Path(__file__).with_name("toy_cascade_ultrapixel.safetensors")
PATCH = 2
NATIVE = toy_world.NATIVE_LATENT_SIZE  # 32 latent px
CLIP_DIM = toy_world.CONTEXT_DIM
STAGE_C = {
    "stable_cascade_stage": "c", "c_in": 4, "c_out": 4, "c_r": 64, "patch_size": PATCH, "c_cond": 32,
    "c_hidden": [64, 64], "nhead": [2, 2], "blocks": [[1, 1], [1, 1]], "block_repeat": [[1, 1], [1, 1]],
    # level 0: four 7x7 ResBlocks (one before the AttnBlock at index 2, where UltraPixel hooks in, three after).
    # One 3x3 ResBlock there left a weak denoiser: 0.29 clean at native size against this one's 0.58 at 5000 steps
    # (0.79 at 10000, 0.83 at the shipped 10000 + 5000; docs/ultrapixel.md, Tenth to Twelfth looks)
    "level_config": ["CTACTCTCT", "CTA"], "kernel_size": 7, "c_clip_text": CLIP_DIM, "c_clip_text_pooled": CLIP_DIM, "c_clip_img": 768,
    "c_clip_seq": 4, "switch_level": [False],
}
# denoise 0.9: start from pure noise at sigma ~7 instead of StageC's 100, where the toy's epsilon is ~3% off (x0 off by ~3)
SAMPLING = {"sampler_name": "euler_ancestral", "scheduler": "simple", "steps": 20, "cfg": 4.0, "denoise": 0.9}


class ToyCascadeConfig(comfy.supported_models.Stable_Cascade_C):
    """Stable Cascade C family with the toy latent; UltraPixel sizes: 8 px per latent px, native 32, patch 2."""

    latent_format = toy_world.ToyWorldLatent
    sampling_settings = {"shift": 1.0}
    supported_inference_dtypes = [torch.float32]
    ultrapixel_profile = (toy_world.ToyWorldCodec.ratio, NATIVE, PATCH)


def build_model(state_dict: dict | None = None) -> comfy.model_patcher.ModelPatcher:
    return toy_world.model_of(ToyCascadeConfig(dict(STAGE_C)), state_dict)


def conditioning(embeddings: torch.Tensor, index: int) -> list:
    """StageC conditioning: the class tokens as text tokens, their mean as the pooled vector."""
    tokens = embeddings[index:index + 1].clone()
    return [[tokens, {"pooled_output": tokens.mean(1, keepdim=True)}]]


def load(path: pathlib.Path = WEIGHTS):
    """(ModelPatcher, class embeddings) from the shipped weights."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} is missing: train it with `.venv/bin/python tests/toy_world/train_cascade.py base` "
                                "(see docs/ultrapixel.md for its state)")
    sd = safetensors.torch.load_file(str(path))
    embeddings = sd.pop(toy_world.EMBEDDINGS_KEY)
    return build_model(sd), embeddings
