"""Does a toy StageC sample clean pictures at its native size? The check a base run must pass before its
UltraPixel modules are trained (tests/toy_world/train_cascade.py).

    .venv/bin/python tests/toy_world/check_cascade.py nodes/toy_cascade.safetensors [--seeds 12] [--cfg 4]

Seeds 0..n-1 (shape = seed mod 3), 32x32 latent px, the toy StageC's sampling (euler_ancestral, simple,
20 steps, denoise 0.9, shift 1) with the reference's CFG rescale 0.7; prints measure.summary and each picture's
(objects, residual_rms). A picture is clean when measure.py reads it as gradient + flat objects.

    .venv/bin/python tests/toy_world/check_cascade.py nodes/toy_cascade.safetensors --x0-error

instead compares one-step denoising with the toy SD UNet's (the shipped toy world) on the same 24 scenes and
noise: per sigma, the rms x0 error with the right class and with the unconditional tokens, and how much the
class moves the prediction (rms of x0(class) - x0(uncond)), each through the model's own apply_model.
"""

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import host  # noqa: E402,F401  (the real ComfyUI host on CPU, with the pack importable)
from bench.repetition import noise  # noqa: E402
from toy_world import measure  # noqa: E402

import comfy.sample  # noqa: E402
import comfy.utils  # noqa: E402
from toy_world import scenes  # noqa: E402
from ultrares.nodes import toy_cascade, toy_world  # noqa: E402
from ultrares.nodes import ultrapixel  # noqa: E402

X0_SIGMAS = (12.8, 6.4, 3.1, 1.4, 0.5)  # StageC's schedule at t = 0.95, 0.9, 0.8, 0.6, 0.3


def x0_errors(weights: pathlib.Path, scenes_n: int = 24) -> None:
    stage_c, c_embeddings = toy_cascade.load(weights)
    sd_weights, sd_embeddings = toy_world.load_weights(toy_world.WEIGHTS)
    unet = toy_world.build_model(sd_weights)
    gen = torch.Generator().manual_seed(123)
    rgb, kinds = scenes.sample(scenes_n, gen)
    x0 = toy_world.to_latent(rgb)
    uncond = torch.full_like(kinds, len(toy_world.SHAPES))  # both models' unconditional row

    def stage_c_x0(x, sigma, labels):
        tokens = c_embeddings[labels]
        return stage_c.model.apply_model(x, sigma, clip_text=tokens, clip_text_pooled=tokens.mean(1, keepdim=True),
                                         clip_img=torch.zeros(len(x), 1, 768))

    def unet_x0(x, sigma, labels):
        return unet.model.apply_model(x, sigma, c_crossattn=sd_embeddings[labels])

    rms = lambda d: float(d.pow(2).mean().sqrt())
    print("| sigma | model | x0 rms error (class) | x0 rms error (uncond) | class effect |\n|---|---|---|---|---|")
    with torch.inference_mode():
        for value in X0_SIGMAS:
            sigma = torch.full((scenes_n,), value)
            x = x0 + value * torch.randn(x0.shape, generator=gen)
            for name, fn in (("toy StageC", stage_c_x0), ("toy SD UNet", unet_x0)):
                right, free = fn(x, sigma, kinds), fn(x, sigma, uncond)
                print(f"| {value} | {name} | {rms(right - x0):.3f} | {rms(free - x0):.3f} | {rms(right - free):.4f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", type=pathlib.Path)
    p.add_argument("--seeds", type=int, default=12)
    p.add_argument("--cfg", type=float, default=toy_cascade.SAMPLING["cfg"])
    p.add_argument("--denoise", type=float, default=toy_cascade.SAMPLING["denoise"])
    p.add_argument("--x0-error", action="store_true", help="compare one-step x0 errors with the toy SD UNet's instead of sampling")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.x0_error:
        return x0_errors(a.weights)
    comfy.utils.PROGRESS_BAR_ENABLED = False
    model, embeddings = toy_cascade.load(a.weights)
    model = ultrapixel.reference_sampling(model, 1.0, 0.7)
    s = toy_cascade.SAMPLING
    n_shapes = len(embeddings) - 1
    outs = []
    for shape in range(n_shapes):
        seeds = [i for i in range(a.seeds) if i % n_shapes == shape]
        if not seeds:
            continue
        positive, negative = toy_cascade.conditioning(embeddings, shape), toy_cascade.conditioning(embeddings, n_shapes)
        latent = torch.zeros(len(seeds), 4, toy_cascade.NATIVE, toy_cascade.NATIVE)
        with torch.inference_mode():
            outs.append(comfy.sample.sample(model, noise(seeds, toy_cascade.NATIVE), s["steps"], a.cfg, s["sampler_name"], s["scheduler"],
                                            positive, negative, latent, seed=seeds[0], denoise=a.denoise, disable_pbar=True))
    readings = measure.read_latents(torch.cat(outs))
    print(measure.summary(readings))
    print([(r.objects, round(r.residual_rms, 3)) for r in readings])


if __name__ == "__main__":
    main()
