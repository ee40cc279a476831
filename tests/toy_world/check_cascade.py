"""Does a toy StageC sample clean pictures at its native size? The check a base run must pass before its
UltraPixel modules are trained (tests/toy_world/train_cascade.py).

    .venv/bin/python tests/toy_world/check_cascade.py nodes/toy_cascade.safetensors [--seeds 12] [--cfg 4]

Seeds 0..n-1 (shape = seed mod 3), 32x32 latent px, the toy StageC's sampling (euler_ancestral, simple,
20 steps, denoise 0.9, shift 1) with the reference's CFG rescale 0.7; prints measure.summary and each picture's
(objects, residual_rms). A picture is clean when measure.py reads it as gradient + flat objects.
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
from ultrares.nodes import toy_cascade  # noqa: E402
from ultrares.nodes import ultrapixel  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", type=pathlib.Path)
    p.add_argument("--seeds", type=int, default=12)
    p.add_argument("--cfg", type=float, default=toy_cascade.SAMPLING["cfg"])
    p.add_argument("--denoise", type=float, default=toy_cascade.SAMPLING["denoise"])
    a = p.parse_args()
    torch.set_num_threads(1)
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
