"""UltraPixel on the toy StageC at 4x (and any other scale): direct sampling vs the UltraPixel LR pass
+ guided HR pass, on the toy-world repetition yardstick (tests/toy_world/measure.py).

  .venv/bin/python tests/bench/ultrapixel_toy.py --json out/ultrapixel_toy.json [--seeds 33] [--scale 4] [--base F --modules G]

Both run through the real host's nodes (UltraPixel Loader on the shipped toy modules, UltraPixel LR
Pass, KSampler's sampling) with the toy StageC's settings (euler_ancestral / simple / 20 steps /
denoise 0.9 / CFG 4, shift 1, CFG rescale 0.7 for both), one picture per seed (its own noise, shape seed % 3),
batched per shape, one torch thread. Per method it reports the repetition figures of
tests/bench/repetition.py (repetition_rate, clean_rate, ...), sec_per_image (wall seconds of
sampling per picture, the LR pass included for UltraPixel; both measured in this run) and, for
UltraPixel, lr_mse: MSE between the HR result averaged down to the LR size and the LR pass's picture.

Status: 33 seeds on the shipped nodes/toy_cascade*.safetensors in docs/ultrapixel.md ("Twelfth look"):
repetition 0.91 -> 0.03, 1.12x the seconds, 0.64 clean.
"""

import argparse
import json
import pathlib
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import host  # noqa: E402  (the real ComfyUI host on CPU)

import comfy.sample  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import torch  # noqa: E402
from bench.repetition import noise, table  # noqa: E402
from toy_world import measure  # noqa: E402
from ultrares.nodes import toy_cascade, toy_world  # noqa: E402
from ultrares.nodes import ultrapixel as node  # noqa: E402

SAMPLING = toy_cascade.SAMPLING
SAMPLER, SCHEDULER, STEPS, CFG, DENOISE = (SAMPLING[k] for k in ("sampler_name", "scheduler", "steps", "cfg", "denoise"))
SHIFT, RESCALE = 1.0, 0.7
PX = toy_world.ToyWorldCodec.ratio  # picture px per latent px


def modules_file(path: pathlib.Path = toy_cascade.ULTRAPIXEL_WEIGHTS) -> str:
    """Toy modules (the shipped ones by default) put where the UltraPixel Loader looks for weights."""
    folder = pathlib.Path(folder_paths.get_folder_paths(node.FOLDER)[0])
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, folder / path.name)
    return path.name


def run(method, model, embeddings, seeds, size):
    latents, lows, seconds = {}, {}, 0.0
    for shape in range(len(toy_world.SHAPES)):
        group = [s for s in seeds if s % 3 == shape]
        if not group:
            continue
        pos, neg = toy_cascade.conditioning(embeddings, shape), toy_cascade.conditioning(embeddings, len(toy_world.SHAPES))
        start = time.perf_counter()
        sampler_model = node.reference_sampling(model, SHIFT, RESCALE)
        if method == "ultrapixel":
            sampler_model, hr, lr = host.run_node(
                node.UltraPixelLRPass, model=model, positive=pos, negative=neg, width=size * PX, height=size * PX, seed=group[0],
                steps=STEPS, cfg=CFG, sampler_name=SAMPLER, scheduler=SCHEDULER, shift=SHIFT, cfg_rescale=RESCALE,
                batch_size=len(group), denoise=DENOISE)
            lows.update({s: lr["samples"][i:i + 1] for i, s in enumerate(group)})
        out = comfy.sample.sample(sampler_model, noise(group, size), STEPS, CFG, SAMPLER, SCHEDULER, pos, neg,
                                  torch.zeros(len(group), 4, size, size), seed=group[0], denoise=DENOISE, disable_pbar=True)
        seconds += time.perf_counter() - start
        latents.update({s: out[i:i + 1] for i, s in enumerate(group)})
    ordered = torch.cat([latents[s] for s in seeds])
    figures = measure.summary(measure.read_latents(ordered, size // toy_cascade.NATIVE))  # edge band: the scale
    figures["contrast"] = float(ordered[:, :3].flatten(1).std(1).mean())
    figures["sec_per_image"] = seconds / len(seeds)
    if lows:
        low = torch.cat([lows[s] for s in seeds])
        down = torch.nn.functional.adaptive_avg_pool2d(ordered[:, :3], low.shape[-2:])
        figures["lr_mse"] = float(((down - low[:, :3]) ** 2).mean())
        figures["lr_clean_rate"] = measure.summary(measure.read_latents(low))["clean_rate"]
    return figures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=pathlib.Path)
    p.add_argument("--seeds", type=int, default=33)
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--base", type=pathlib.Path, default=toy_cascade.WEIGHTS, help="the toy StageC (default: the shipped one)")
    p.add_argument("--modules", type=pathlib.Path, default=toy_cascade.ULTRAPIXEL_WEIGHTS,
                   help="its UltraPixel modules (default: the shipped ones)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    comfy.utils.PROGRESS_BAR_ENABLED = False
    base, embeddings = toy_cascade.load(args.base)
    loaded = host.run_node(node.UltraPixelLoader, model=base, ultrapixel_name=modules_file(args.modules))[0]
    seeds, size = list(range(args.seeds)), toy_cascade.NATIVE * args.scale
    results = {"direct@1x": run("direct", base, embeddings, seeds, toy_cascade.NATIVE)}
    for method, model in (("direct", base), ("ultrapixel", loaded)):
        results[f"{method}@{args.scale}x"] = run(method, model, embeddings, seeds, size)
        print(f"{method}@{args.scale}x: {results[f'{method}@{args.scale}x']}", flush=True)
    direct, guided = results[f"direct@{args.scale}x"], results[f"ultrapixel@{args.scale}x"]
    results["ratios"] = {"repetition": guided["repetition_rate"] / max(direct["repetition_rate"], 1e-9),
                         "seconds": guided["sec_per_image"] / direct["sec_per_image"]}
    print(f"\ntoy StageC, {len(seeds)} seeds, {SAMPLER}/{SCHEDULER}, {STEPS} steps, denoise {DENOISE}, CFG {CFG:g}, shift {SHIFT:g}, rescale {RESCALE}\n\n"
          f"{table({k: v for k, v in results.items() if k != 'ratios'})}\n\nratios (UltraPixel / direct): {results['ratios']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        weights = {"base": str(args.base), "modules": str(args.modules)}
        args.json.write_text(json.dumps(dict(results, weights=weights), indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
