"""Toy 4x super-resolution benchmark for PASD: held-out toy scenes rendered at 4x (128x128 latent px,
tests/toy_world/scenes.py) are the ground truth; their degraded low-res versions (32x32, blur + noise +
JPEG-like quantisation + 4x down-sampling, tests/toy_world/sr_task.py) are upscaled 4x by
  bicubic          the hint itself (the low-res image scaled bicubically)
  img2img@0.3/0.6  hires fix: the toy UNet from the encoded bicubic picture at denoise 0.3 / 0.6
  controlnet-only  the trained toy PASD ControlNet without PACA (plain SD + ControlNet)
  pasd             the toy PASD: ControlNet + PACA (PASD UNet Loader)
both ControlNet entries from the reference's init latent (the encoded hint, double-noised: x sqrt(abar_900),
then sampled from sigma_max) with the class as the prompt (PASD's high-level information), decoded and
colour-fixed against the hint as the bundled workflow does (PASD Color Fix); `pasd-raw` is PASD before it.
`--color-levels 5,7` also reads each ControlNet method's output colour-fixed at the other levels (same samples).

  .venv/bin/python tests/bench/pasd_sr.py --json out/pasd_sr.json [--scenes 12] [--steps 20] [--methods pasd,bicubic]

Figures per method (at latent resolution, where toy pictures live):
  psnr         dB against the ground truth (RGB in [0, 1])
  edge_error   mean |Sobel gradient magnitude difference| against the ground truth
  clean_rate   share of pictures that read as "gradient + flat objects" (measure.py), so noise cannot pass
  repetition   share of pictures with more than one object
"""

import argparse
import json
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import host  # noqa: E402  (the real ComfyUI host on CPU)

import comfy.utils  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from toy_world import measure, sr_task, train_pasd  # noqa: E402
from ultrares.nodes import toy_world  # noqa: E402
from ultrares.patches import pasd  # noqa: E402

SCALE = 4
SAMPLER, SCHEDULER, CFG = "uni_pc", "karras", 2.0  # the reference's UniPC; the toy world's CFG


def node(node_id, **inputs):
    return host.run_node(host.load_nodes()[node_id], **inputs)


def install(folder: str, name: str, weights_dir: pathlib.Path) -> str:
    """Expose a toy PASD file (shipped in nodes/, or another training run's) to the host's model folders."""
    link = host.BASE_DIRECTORY / "models" / folder / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to((weights_dir / name).resolve())
    return name


def psnr(a, b):
    mse = float((((a - b) / 2) ** 2).mean())
    return 10 * math.log10(1 / max(mse, 1e-12))


def edges(x):
    gray = x[:, :3].mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    gx, gy = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kx), F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kx.transpose(2, 3))
    return torch.sqrt(gx ** 2 + gy ** 2)


def figures(out, gt):
    readings = measure.read_latents(out, SCALE)  # the edge band of a picture SCALE x the native side
    return {"psnr": sum(psnr(o, g) for o, g in zip(out[:, :3], gt)) / len(gt),
            "edge_error": float((edges(out) - edges(gt)).abs().mean()),
            "clean_rate": sum(r.clean for r in readings) / len(readings),
            "repetition": sum(r.objects > 1 for r in readings) / len(readings)}


def save_strip(path: pathlib.Path, rows: list) -> None:
    """Pictures at latent resolution, each row side by side, rows stacked (a 2x nearest zoom so edges stay visible)."""
    from PIL import Image
    grid = torch.cat([torch.cat(list(r[:, :3]), dim=-1) for r in rows], dim=-2)
    grid = F.interpolate(grid[None], scale_factor=2, mode="nearest")[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(path)


@torch.inference_mode()  # as the host's executor runs nodes: the loaded ControlNet's weights require grad
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=pathlib.Path)
    p.add_argument("--scenes", type=int, default=12)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=1000, help="held-out scenes: training draws from seed 0")
    p.add_argument("--save-dir", type=pathlib.Path, help="write one PNG per method (its pictures side by side, ground truth first)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a shared 2-core machine)")
    p.add_argument("--methods", default="", help="comma-separated subset of the methods (default: all)")
    p.add_argument("--weights-dir", type=pathlib.Path, default=train_pasd.OUT_DIR, help="where the toy PASD files are (default: the shipped ones)")
    p.add_argument("--tile", type=int, default=0, help="run both ControlNet methods through PASD Tiled Sampling at this tile side "
                                                       "(latent px; 0: untiled, the reference's path below 320)")
    p.add_argument("--tile-overlap", type=int, default=pasd.TILE_OVERLAP)
    p.add_argument("--color-levels", default="5", help="comma-separated wavelet levels of the colour fix: the first (reference: 5) "
                                                        "is the method's row, each other one adds a '<method>, levels N' row")
    args = p.parse_args(argv)
    levels = [int(v) for v in args.color_levels.split(",")]
    torch.set_num_threads(args.threads)
    comfy.utils.PROGRESS_BAR_ENABLED = False
    gen = torch.Generator().manual_seed(args.seed)
    gt, kinds = sr_task.ground_truth(args.scenes, gen, SCALE)
    size = gt.shape[-1]
    hints = torch.cat([sr_task.hint(lr, (size, size)) for lr in sr_task.degrade(gt, gen, factor=SCALE)])
    images = hints.permute(0, 2, 3, 1)  # IMAGE (B, H, W, 3)

    model, _, _, vae = node("UltraResToyWorldLoader", shape=toy_world.SHAPES[0])
    _, embeddings = toy_world.load_weights(toy_world.WEIGHTS)
    controlnet = node("UltraResPASDControlNetLoader", model=model, control_net_name=install("controlnet", train_pasd.CONTROLNET_FILE, args.weights_dir))[0]
    pasd_model = node("UltraResPASDUNetLoader", model=model, unet_name=install("diffusion_models", train_pasd.UNET_FILE, args.weights_dir))[0]
    control_model = model
    if args.tile:  # per-step tiles near the size PACA and the ControlNet were trained on
        control_model, pasd_model = (node("UltraResPASDTiledSampling", model=m, tile_size=args.tile, tile_overlap=args.tile_overlap)[0]
                                     for m in (model, pasd_model))
    sampling = model.get_model_object("model_sampling")
    init_scale = pasd.init_latent_scale(sampling.sigmas)  # the reference's double noising
    encoded = vae.encode(images)

    def sample(m, index, latent, denoise, control):
        positive, negative = toy_world.conditioning(embeddings, int(kinds[index])), toy_world.conditioning(embeddings, len(toy_world.SHAPES))
        if control:
            positive, negative = node("ControlNetApplyAdvanced", positive=positive, negative=negative, control_net=controlnet,
                                      image=images[index:index + 1], strength=1.0, start_percent=0.0, end_percent=1.0)[:2]
        return node("KSampler", model=m, seed=index, steps=args.steps, cfg=CFG, sampler_name=SAMPLER, scheduler=SCHEDULER,
                    positive=positive, negative=negative, latent_image={"samples": latent}, denoise=denoise)[0]["samples"]

    methods = {
        "bicubic": None,
        "img2img@0.3": (model, 1.0, 0.3, False),
        "img2img@0.6": (model, 1.0, 0.6, False),
        "controlnet-only": (control_model, init_scale, 1.0, True),
        "pasd": (pasd_model, init_scale, 1.0, True),
    }
    if args.methods:
        wanted = set(args.methods.split(","))
        if "pasd-raw" in wanted:  # read off the pasd run before its colour fix
            wanted = wanted - {"pasd-raw"} | {"pasd"}
        unknown = wanted - set(methods)
        if unknown:
            raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {sorted(methods) + ['pasd-raw']}")
        methods = {k: v for k, v in methods.items() if k in wanted}

    def color_fixed(image, level):
        return vae.encode(node("UltraResPASDColorFix", image=image, reference=images, levels=level)[0])

    results = {"ground_truth": figures(toy_world.to_latent(gt), gt)}
    for name, spec in methods.items():
        start = time.perf_counter()
        if spec is None:
            out = encoded
        else:
            m, scale, denoise, control = spec
            out = []
            for i in range(args.scenes):
                out.append(sample(m, i, encoded[i:i + 1] * scale, denoise, control))
                print(f"  {name} {i + 1}/{args.scenes} {time.perf_counter() - start:.0f}s", flush=True)
            out = torch.cat(out)
        seconds = (time.perf_counter() - start) / args.scenes
        if spec is not None and spec[3]:  # the ControlNet methods: PASD's recipe ends with the colour fix
            if name == "pasd":
                results["pasd-raw"] = figures(out, gt) | {"sec_per_image": seconds}
            decoded = vae.decode(out)  # once, for every level
            for extra in levels[1:]:
                results[f"{name}, levels {extra}"] = figures(color_fixed(decoded, extra), gt) | {"sec_per_image": seconds}
            out = color_fixed(decoded, levels[0])
        results[name] = figures(out, gt) | {"sec_per_image": seconds}
        if args.save_dir:
            save_strip(args.save_dir / f"{name}.png", [toy_world.to_latent(gt), out])
        print(f"{name}: {results[name]}", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"settings": {"scenes": args.scenes, "steps": args.steps, "sampler": SAMPLER,
                                                          "scheduler": SCHEDULER, "cfg": CFG, "seed": args.seed,
                                                          "tile": args.tile, "tile_overlap": args.tile_overlap, "color_levels": levels, "weights_dir": str(args.weights_dir)}, "results": results}, indent=1) + "\n")
    cols = ("psnr", "edge_error", "clean_rate", "repetition", "sec_per_image")
    print("\n| method | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
    for name, f in results.items():
        print(f"| {name} | " + " | ".join(f"{f[c]:.3f}" if c in f else "" for c in cols) + " |")
    return results


if __name__ == "__main__":
    main()
