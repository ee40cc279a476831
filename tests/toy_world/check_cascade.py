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

    .venv/bin/python tests/toy_world/check_cascade.py nodes/toy_cascade.safetensors --attention

instead prints, per AttnBlock of the StageC and per sigma, the share of softmax mass its queries put on the clip
tokens (class, pooled and image tokens; the rest goes to the spatial tokens of its self-attention) and how much
the class moves that block's attention output (rms of out(class) - out(uncond)); then, per sigma, how large
the deep level's contribution to the shallow up path is beside the shallow skip it is added to (rms of each,
less its per-picture mean) and how much the class moves it.

    .venv/bin/python tests/toy_world/check_cascade.py nodes/toy_cascade.safetensors --shrinkage

instead asks whether each model's one-step x0 guess keeps the picture's contrast (both models, the same 24 scenes
and noise, sigma 0.05-4): the rms x0 error, the regression slope of the guess on the truth (each less its
per-picture mean; 1 = full contrast) and the ratio of their rms; then samples from real scenes noised to
sigma 1.4 and 0.5 (the tail of each model's own schedule) and prints the clean rate: a model whose late
steps keep clean pictures clean reads 1.0 there; last, the contrast of each step's x0 guess while sampling from noise.
"""

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import host  # noqa: E402,F401  (the real ComfyUI host on CPU, with the pack importable)
from bench.repetition import noise  # noqa: E402
from toy_world import measure  # noqa: E402

import comfy.model_base  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.utils  # noqa: E402
from toy_world import scenes  # noqa: E402
from ultrares.nodes import toy_cascade, toy_world  # noqa: E402
from ultrares.nodes import ultrapixel  # noqa: E402

X0_SIGMAS = (12.8, 6.4, 3.1, 1.4, 0.5)  # StageC's schedule at t = 0.95, 0.9, 0.8, 0.6, 0.3
SHRINK_SIGMAS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0)
RESTART_SIGMAS = (1.4, 0.5)


def both_models(weights: pathlib.Path):
    """{name: (patcher, embeddings, conditioning, sampling)} for the toy StageC and the shipped toy SD UNet."""
    stage_c, c_embeddings = toy_cascade.load(weights)
    sd_weights, sd_embeddings = toy_world.load_weights(toy_world.WEIGHTS)
    return {"toy StageC": (ultrapixel.reference_sampling(stage_c, 1.0, 0.7), c_embeddings, toy_cascade.conditioning, toy_cascade.SAMPLING),
            "toy SD UNet": (toy_world.build_model(sd_weights), sd_embeddings, toy_world.conditioning, dict(toy_world.SAMPLING, denoise=1.0))}


def by_shape(embeddings, conditioning, seeds, shape_of, run) -> list:
    """Sampling batched per class, one prompt per batch: run(seeds of the class, positive, negative) for each class
    that has seeds, under inference_mode; the results in class order."""
    n_shapes, outs = len(embeddings) - 1, []
    for shape in range(n_shapes):
        idx = [i for i in seeds if shape_of(i) == shape]
        if idx:
            with torch.inference_mode():
                outs.append(run(idx, conditioning(embeddings, shape), conditioning(embeddings, n_shapes)))
    return outs


def x0_guess(patcher, embeddings, x, sigma, labels):
    tokens = embeddings[labels]
    if isinstance(patcher.model, comfy.model_base.StableCascade_C):
        return patcher.model.apply_model(x, sigma, clip_text=tokens, clip_text_pooled=tokens.mean(1, keepdim=True),
                                         clip_img=torch.zeros(len(x), 1, 768))
    return patcher.model.apply_model(x, sigma, c_crossattn=tokens)


def shrinkage(weights: pathlib.Path, scenes_n: int = 24) -> dict:
    """{(model, "one step", sigma): (error, slope, ratio), (model, "restart", sigma): clean rate,
    (model, "contrast per step"): [x0 contrast]}, also printed."""
    models, rows = both_models(weights), {}
    gen = torch.Generator().manual_seed(123)
    rgb, kinds = scenes.sample(scenes_n, gen)
    x0 = toy_world.to_latent(rgb)
    centred = lambda t: t - t.mean((2, 3), keepdim=True)
    print("| sigma | model | x0 rms error | slope on the truth | rms ratio |\n|---|---|---|---|---|")
    with torch.inference_mode():
        for value in SHRINK_SIGMAS:
            x = x0 + value * torch.randn(x0.shape, generator=gen)
            for name, (patcher, embeddings, _, _) in models.items():
                guess = x0_guess(patcher, embeddings, x, torch.full((scenes_n,), value), kinds)
                slope = float((centred(guess) * centred(x0)).sum() / centred(x0).pow(2).sum())
                ratio = float(centred(guess).pow(2).mean().sqrt() / centred(x0).pow(2).mean().sqrt())
                error = float((guess - x0).pow(2).mean().sqrt())
                rows[name, "one step", value] = (error, slope, ratio)
                print(f"| {value} | {name} | {error:.4f} | {slope:.3f} | {ratio:.3f} |")
    print("\n| start sigma | model | steps | clean | one object |\n|---|---|---|---|---|")
    seeds = list(range(scenes_n))
    for start in RESTART_SIGMAS:
        for name, (patcher, embeddings, conditioning, s) in models.items():
            full = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), s["scheduler"], round(s["steps"] / s["denoise"]))
            sigmas = torch.cat([torch.tensor([start]), full[full < start]])
            sampler = comfy.samplers.sampler_object(s["sampler_name"])
            outs = by_shape(embeddings, conditioning, seeds, lambda i: int(kinds[i]), lambda idx, positive, negative: comfy.sample.sample_custom(
                patcher, noise(idx, toy_world.NATIVE_LATENT_SIZE), s["cfg"], sampler, sigmas, positive, negative, x0[idx].clone(),
                seed=idx[0], disable_pbar=True))
            readings = measure.read_latents(torch.cat(outs))
            summary = measure.summary(readings)
            rows[name, "restart", start] = summary["clean_rate"]
            print(f"| {start} | {name} | {len(sigmas) - 1} | {summary['clean_rate']:.2f} | {summary['one_object_rate']:.2f} |")
    contrast = lambda t: float(t[:, :3].std((2, 3)).mean())  # RGB std per picture and channel, averaged
    print(f"\nx0 contrast while sampling from noise (seeds 0..{scenes_n - 1}; the scenes': {contrast(x0):.3f})")
    for name, (patcher, embeddings, conditioning, s) in models.items():
        per_step = {}
        record = lambda step, guess, x, total: per_step.setdefault(step, []).append(contrast(guess) * len(guess))
        by_shape(embeddings, conditioning, seeds, lambda i: i % (len(embeddings) - 1), lambda idx, positive, negative: comfy.sample.sample(
            patcher, noise(idx, toy_world.NATIVE_LATENT_SIZE), s["steps"], s["cfg"], s["sampler_name"], s["scheduler"], positive, negative,
            torch.zeros_like(x0[idx]), seed=idx[0], denoise=s["denoise"], disable_pbar=True, callback=record))
        rows[name, "contrast per step"] = [sum(v) / scenes_n for _, v in sorted(per_step.items())]
        print(name, " ".join(f"{c:.3f}" for c in rows[name, "contrast per step"]))
    return rows


def x0_errors(weights: pathlib.Path, scenes_n: int = 24) -> None:
    models = both_models(weights)
    gen = torch.Generator().manual_seed(123)
    rgb, kinds = scenes.sample(scenes_n, gen)
    x0 = toy_world.to_latent(rgb)
    uncond = torch.full_like(kinds, len(toy_world.SHAPES))  # both models' unconditional row

    rms = lambda d: float(d.pow(2).mean().sqrt())
    print("| sigma | model | x0 rms error (class) | x0 rms error (uncond) | class effect |\n|---|---|---|---|---|")
    with torch.inference_mode():
        for value in X0_SIGMAS:
            sigma = torch.full((scenes_n,), value)
            x = x0 + value * torch.randn(x0.shape, generator=gen)
            for name, (patcher, embeddings, _, _) in models.items():
                right, free = (x0_guess(patcher, embeddings, x, sigma, labels) for labels in (kinds, uncond))
                print(f"| {value} | {name} | {rms(right - x0):.3f} | {rms(free - x0):.3f} | {rms(right - free):.4f} |")


def attention_mass(weights: pathlib.Path, scenes_n: int = 24) -> list:
    """Rows (sigma, block, clip mass with the class, with the uncond tokens, class effect on the block's output)."""
    from comfy.ldm.cascade.common import AttnBlock
    stage_c, embeddings = toy_cascade.load(weights)
    gen = torch.Generator().manual_seed(123)
    rgb, kinds = scenes.sample(scenes_n, gen)
    x0 = toy_world.to_latent(rgb)
    uncond = torch.full_like(kinds, len(embeddings) - 1)
    # blocks in module order: down level 0, down level 1, up level 1, up level 0
    attentions = [m.attention.attn for m in stage_c.model.diffusion_model.modules() if isinstance(m, AttnBlock)]
    seen = []

    def record(attn, args):  # OptimizedAttention(q, k, v): k and v are [spatial tokens (self-attention only); clip tokens]
        q, k, v = attn.to_q(args[0]), attn.to_k(args[1]), attn.to_v(args[2])
        heads = lambda t: t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        q, k, v = heads(q), heads(k), heads(v)
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        clip = slice(k.shape[2] - len(embeddings[0]) - 2 * toy_cascade.STAGE_C["c_clip_seq"], None)
        seen.append((float(weights[..., clip].sum(-1).mean()), weights @ v))

    hooks = [a.register_forward_pre_hook(record) for a in attentions]
    unet, paths = stage_c.model.diffusion_model, {}
    hooks += [unet.up_upscalers[0].register_forward_hook(lambda m, a, out: paths.__setitem__("deep", out)),
              unet.down_blocks[0][-1].register_forward_hook(lambda m, a, out: paths.__setitem__("skip", out))]
    centred_rms = lambda t: float((t - t.mean((2, 3), keepdim=True)).pow(2).mean().sqrt())
    deep_rows = []
    print("| sigma | block | clip mass (class) | clip mass (uncond) | class effect on the output |\n|---|---|---|---|---|")
    rows = []
    try:
        with torch.inference_mode():
            for value in X0_SIGMAS:
                sigma = torch.full((scenes_n,), value)
                x = x0 + value * torch.randn(x0.shape, generator=gen)
                runs, deep = [], []
                for labels in (kinds, uncond):
                    seen.clear()
                    tokens = embeddings[labels]
                    stage_c.model.apply_model(x, sigma, clip_text=tokens, clip_text_pooled=tokens.mean(1, keepdim=True),
                                              clip_img=torch.zeros(len(x), 1, 768))
                    runs.append(list(seen))
                    deep.append(dict(paths))
                deep_rows.append((value, centred_rms(deep[0]["deep"]), centred_rms(deep[0]["skip"]),
                                  float((deep[0]["deep"] - deep[1]["deep"]).pow(2).mean().sqrt())))
                for i, ((mass, out), (free_mass, free_out)) in enumerate(zip(*runs)):
                    rows.append((value, i, mass, free_mass, float((out - free_out).pow(2).mean().sqrt())))
                    print("| {} | {} | {:.4f} | {:.4f} | {:.4f} |".format(*rows[-1]))
    finally:
        for h in hooks:
            h.remove()
    print("\n| sigma | deep path into the shallow up level (rms) | shallow skip (rms) | class effect on the deep path |\n|---|---|---|---|")
    for row in deep_rows:
        print("| {} | {:.4f} | {:.4f} | {:.4f} |".format(*row))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", type=pathlib.Path)
    p.add_argument("--seeds", type=int, default=12)
    p.add_argument("--cfg", type=float, default=toy_cascade.SAMPLING["cfg"])
    p.add_argument("--denoise", type=float, default=toy_cascade.SAMPLING["denoise"])
    p.add_argument("--x0-error", action="store_true", help="compare one-step x0 errors with the toy SD UNet's instead of sampling")
    p.add_argument("--attention", action="store_true", help="measure the attention mass on the clip tokens instead of sampling")
    p.add_argument("--shrinkage", action="store_true", help="does the one-step x0 guess keep the contrast, and do late steps keep real pictures clean")
    a = p.parse_args()
    torch.set_num_threads(1)
    comfy.utils.PROGRESS_BAR_ENABLED = False
    if a.shrinkage:
        return shrinkage(a.weights)
    if a.x0_error:
        return x0_errors(a.weights)
    if a.attention:
        return attention_mass(a.weights)
    model, embeddings = toy_cascade.load(a.weights)
    model = ultrapixel.reference_sampling(model, 1.0, 0.7)
    s = toy_cascade.SAMPLING
    outs = by_shape(embeddings, toy_cascade.conditioning, range(a.seeds), lambda i: i % (len(embeddings) - 1), lambda seeds, positive, negative: comfy.sample.sample(
        model, noise(seeds, toy_cascade.NATIVE), s["steps"], a.cfg, s["sampler_name"], s["scheduler"], positive, negative,
        torch.zeros(len(seeds), 4, toy_cascade.NATIVE, toy_cascade.NATIVE), seed=seeds[0], denoise=a.denoise, disable_pbar=True))
    readings = measure.read_latents(torch.cat(outs))
    print(measure.summary(readings))
    print([(r.objects, round(r.residual_rms, 3)) for r in readings])


if __name__ == "__main__":
    main()
