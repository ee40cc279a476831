"""Seconds per sampling step of ScaleCrafter's patched models relative to the unpatched model at the
same size, all in one run on the real host (stock sampler path, CFG on, euler).

  python tests/bench/scalecrafter_speed.py --json out/scalecrafter_speed.json [--sizes 64,128] [--steps 6] [--repeats 3] [--threads 1]

The UNet is the toy world's (SD1.5 blocks, model_channels 32, levels 1,2,2; native 32x32) with
seeded random weights: speed does not depend on training. Variants are timed interleaved, repeated,
and reported by their median, so load from other processes hits all of them alike.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import host  # noqa: E402  (the real ComfyUI host on CPU)
import tiny_models  # noqa: E402

import comfy.sample  # noqa: E402
import torch  # noqa: E402
from ultrares.nodes import scalecrafter as ns  # noqa: E402

NATIVE = 32


def redilated(model, **inputs):
    args = dict(preset=ns.AUTO, sdxl_layers="intended", schedule="custom", start_percent=0.0, end_percent=1.0, progressive=False,
                native_latent_size=NATIVE, dilation=0.0, dispersion_start_percent=0.0, dispersion_end_percent=0.0)
    return host.run_node(ns.RedilateModel, model=model, **(args | inputs))[0]


def damped(model):
    return host.run_node(ns.NoiseDampedCFG, model=model, damped_uncond="milder dilation", start_percent=0.0, end_percent=1.0)[0]


def variants(model):
    """Every patch active on every step: the worst case (the reference keeps them on for 40-74% of the steps)."""
    plain = redilated(model)
    return {
        "unpatched": model,
        "re-dilation": plain,
        "re-dilation + NDCFG": damped(plain),
        "re-dilation + dispersion": redilated(model, dispersion_end_percent=1.0),
    }


def seconds_per_step(model, size, steps):
    ctx = torch.randn(1, 4, 768, generator=torch.Generator().manual_seed(1))
    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    comfy.sample.sample(model, noise, steps, 4.0, "euler", "normal", [[ctx, {}]], [[ctx * 0, {}]], latent, disable_pbar=True, seed=0)
    return (time.perf_counter() - start) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=pathlib.Path, help="write the figures here")
    p.add_argument("--sizes", default="64,128", help="latent sides, comma-separated (32 is native: 2x and 4x by default)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps ratios steady on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = tiny_models.tiny_sd15()
    models = variants(base)
    results = {}
    for size in (int(s) for s in args.sizes.split(",")):
        for model in models.values():  # warm-up
            seconds_per_step(model, size, 1)
        times = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                times[name].append(seconds_per_step(model, size, args.steps))
        unpatched = statistics.median(times["unpatched"])
        results[f"{size}x{size}"] = {name: {"s_per_step": round(statistics.median(t), 4), "relative": round(statistics.median(t) / unpatched, 3)}
                                     for name, t in times.items()}
        for name, figures in results[f"{size}x{size}"].items():
            print(f"{size}x{size} ({size // NATIVE}x) {name:26s} {figures['s_per_step']:.4f} s/step  x{figures['relative']:.2f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "results": results}, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
