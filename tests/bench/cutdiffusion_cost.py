"""CutDiffusion cost benchmark: seconds per image and peak memory of the Patch Split chains relative
to direct inference at the same size, and our stage-2 windows beside ComfyUI-TiledDiffusion's
MultiDiffusion on the same model, size, tiles and tile batch, all in one run.

Entries (each at every --scales factor over the model's base size):
  direct          the model as loaded, sampled straight at the target size
  multidiffusion  Patch Split with switch_at 0: stage-2 windows only (MultiDiffusion)
  patch_split     Patch Split (stage 1 sub-lattices, then windows), no pixel interaction
  cutdiffusion    Patch Split + Pixel Interaction (the full method)
  ours_windows    = multidiffusion with max_batch = --tile-batch       } the side-by-side: same windows
  tiled_md        TiledDiffusion MultiDiffusion, tile_batch_size = --tile-batch } (size, overlap, batch)

Every entry runs in a fresh child process (the host is CPU-only here), so its peak memory is its
own: peak RSS while sampling minus RSS before (Linux VmHWM, reset through /proc/self/clear_refs),
measured over the first picture; seconds per picture are over all --images pictures.

TiledDiffusion is measured only when its checkout is given (--tiled-diffusion PATH or the env var
ULTRARES_TILED_DIFFUSION); it is imported only inside its own child process, never shipped:
  git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/tiled_diffusion

  nice -n 10 python tests/bench/cutdiffusion_cost.py --json out/cutdiffusion_cost.json [--model toy]
"""

import argparse
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

ENTRIES = ("direct", "multidiffusion", "patch_split", "cutdiffusion", "ours_windows", "tiled_md")
TILED_ENV = "ULTRARES_TILED_DIFFUSION"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=pathlib.Path, help="write the figures here")
    p.add_argument("--model", choices=("toy", "tiny-sd15"), default="toy",
                   help="toy: the pack's toy world (base 32); tiny-sd15: random tiny SD1.5 UNet (timing only, base 32)")
    p.add_argument("--scales", default="2,4")
    p.add_argument("--entries", default=",".join(ENTRIES))
    p.add_argument("--images", type=int, default=3, help="pictures per entry (the first also gives the peak memory)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--tile-batch", type=int, default=4, help="windows per model call in the side-by-side")
    p.add_argument("--tiled-diffusion", type=pathlib.Path, default=os.environ.get(TILED_ENV),
                   help=f"ComfyUI-TiledDiffusion checkout (default: ${TILED_ENV})")
    p.add_argument("--child", nargs=2, metavar=("ENTRY", "SCALE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------ child: one entry, one scale

def memory_kib(field: str) -> int:
    return int(re.search(field + r":\s+(\d+)", pathlib.Path("/proc/self/status").read_text()).group(1))


def load(kind: str):
    """(model, positive, negative, empty latent(size), base size, node runner)."""
    import host
    import torch

    def node(node_id, **inputs):
        return host.run_node(host.load_nodes()[node_id], **inputs)

    if kind == "toy":
        model, positive, negative, _ = node("UltraResToyWorldLoader", shape="disk")
        return model, positive, negative, lambda size: {"samples": torch.zeros(1, 4, size, size)}, 32, node
    import tiny_models

    gen = torch.Generator().manual_seed(0)
    positive, negative = ([[torch.randn(1, 77, 768, generator=gen), {}]] for _ in range(2))
    return tiny_models.tiny_sd15(), positive, negative, lambda size: {"samples": torch.zeros(1, 4, size, size)}, 32, node


def tiled_diffusion_class(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location("tiled_diffusion_bench", path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.NODE_CLASS_MAPPINGS["TiledDiffusion"]


def chain(entry, model, base, node, args):
    split = dict(patch_size=base, switch_at=0.5, switch_unit="fraction of steps", window_overlap=0.5, jitter=True,
                 blend="uniform", max_batch=0, seed=0, sdxl_size_conditioning="image size + window crop")
    if entry == "direct":
        return model
    if entry in ("multidiffusion", "ours_windows"):
        return node("UltraResPatchSplit", model=model, **dict(split, switch_at=0.0,
                                                               max_batch=args.tile_batch if entry == "ours_windows" else 0))[0]
    patched = node("UltraResPatchSplit", model=model, **split)[0]
    if entry == "patch_split":
        return patched
    if entry == "cutdiffusion":
        return node("UltraResPixelInteraction", model=patched, seed=0)[0]
    # TiledDiffusion sizes are image pixels, 8 per latent pixel for this model type
    return tiled_diffusion_class(args.tiled_diffusion)().apply(model, "MultiDiffusion", 8 * base, 8 * base, 8 * base // 2,
                                                               args.tile_batch)[0]


def child(args) -> dict:
    import host  # noqa: F401  (ComfyUI on CPU)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    entry, scale = args.child[0], int(args.child[1])
    model, positive, negative, empty, base, node = load(args.model)
    patched = chain(entry, model, base, node, args)

    def sample(m, size, seed):
        return node("KSampler", model=m, seed=seed, steps=args.steps, cfg=args.cfg, sampler_name="euler",
                    scheduler="normal", positive=positive, negative=negative, latent_image=empty(size), denoise=1.0)[0]

    sample(model, base, 999)  # warm-up at the base size: weights loaded, kernels ready
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS
    before = memory_kib("VmRSS")
    start = time.perf_counter()
    sample(patched, base * scale, 0)
    peak = memory_kib("VmHWM") - before
    for seed in range(1, args.images):
        sample(patched, base * scale, seed)
    return {"sec_per_image": (time.perf_counter() - start) / args.images, "peak_mib": peak / 1024}


# ------------------------------------------------------------------ parent: every entry, one table

def run_child(entry, scale, argv) -> dict:
    cmd = [sys.executable, __file__, *argv, "--child", entry, str(scale)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{entry}@{scale}x failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return None
    names = [e for e in args.entries.split(",") if e]
    if "tiled_md" in names and not (args.tiled_diffusion and (pathlib.Path(args.tiled_diffusion) / "tiled_diffusion.py").is_file()):
        print(f"SKIP tiled_md: no ComfyUI-TiledDiffusion checkout (give --tiled-diffusion PATH or set {TILED_ENV}); "
              "the side-by-side with TiledDiffusion's MultiDiffusion is not measured.", flush=True)
        names.remove("tiled_md")
    results = {}
    for scale in [int(s) for s in args.scales.split(",") if s]:
        for entry in names:
            figures = run_child(entry, scale, argv)
            results[f"{entry}@{scale}x"] = figures
            print(f"{entry}@{scale}x: {figures['sec_per_image']:.2f} s/img, peak {figures['peak_mib']:.0f} MiB", flush=True)
        direct = results.get(f"direct@{scale}x")
        for entry in names:
            f = results[f"{entry}@{scale}x"]
            if direct:
                f["time_vs_direct"] = f["sec_per_image"] / direct["sec_per_image"]
                f["memory_vs_direct"] = f["peak_mib"] / max(direct["peak_mib"], 1e-9)
    print(f"\n{args.model}, euler/normal, {args.steps} steps, CFG {args.cfg}, {args.images} pictures per entry, "
          f"side-by-side tile batch {args.tile_batch}\n")
    print("| entry | s/img | x direct | peak MiB | x direct |\n|---|---|---|---|---|")
    for key, f in results.items():
        print(f"| {key} | {f['sec_per_image']:.2f} | {f.get('time_vs_direct', float('nan')):.2f} | "
              f"{f['peak_mib']:.0f} | {f.get('memory_vs_direct', float('nan')):.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
