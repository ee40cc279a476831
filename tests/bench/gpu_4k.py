"""Seconds per step, seconds per image and peak VRAM of every bundled SDXL and FLUX workflow's chain
at 4096x4096 and 2048x4096, on a CUDA device, with random weights in the workflows' dtypes (fp16
SDXL, bf16 FLUX: the same compute as the real weights). One run, at most --budget seconds.

    .venv/bin/python tests/bench/gpu_4k.py --json out/gpu_4k.json            # CUDA
    .venv/bin/python tests/bench/gpu_4k.py --cpu --json out/gpu_4k_cpu.json  # the same code, tiny

How. The models come from ComfyUI's own classes (tests/bench/chains.py) straight on the device; the
workflow's model nodes run on them as in ComfyUI; ComfyUI's CFGGuider samples with the workflow's
full schedule (so every patch decides as in the real run) through a sampler that evaluates only a
stratified sample of --steps of the schedule's steps (Euler updates between them), after one warm-up
step. Each timed step is bracketed by torch.cuda.synchronize(). Seconds per image = the mean timed
step x the workflow's steps, summed over its samplers. Peak VRAM = torch.cuda.max_memory_allocated
over the chain (weights included; weights alone are given beside it). A chain that runs out of
memory (or fails otherwise) is recorded as such and the run goes on; chains that would start past the
budget are skipped.
Attention: PyTorch SDPA (the host runs with --use-pytorch-cross-attention).

--cpu: tiny model configs in float32, every size and patch divided by 16 (the same chains, on the CPU host).
"""

import argparse
import json
import os
import pathlib
import sys
import time

ARGS = None


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=pathlib.Path, help="write the figures here")
    p.add_argument("--cpu", action="store_true", help="tiny models and sizes on the CPU (smoke mode)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per sampler (plus one warm-up step)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run (9 minutes)")
    p.add_argument("--chain-budget", type=float, default=90.0, help="no further timed steps of a chain after this")
    p.add_argument("--workflows", help="comma-separated workflow names (default: every SDXL and FLUX one)")
    p.add_argument("--sizes", default="4096x4096,2048x4096", help="final sizes W x H")
    return p.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse()
    if not ARGS.cpu:
        os.environ["ULTRARES_HOST_DEVICE"] = "cuda"  # read by tests/host.py when ComfyUI starts

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import host  # noqa: E402,F401
import torch  # noqa: E402

import chains  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.utils  # noqa: E402

FAMILIES = ("SDXL", "FLUX.1-dev")
CPU_SCALE = 16


def random_model(arch: chains.Arch, device, config=None, dtype=None):
    """The architecture on `device` in `dtype` (default: its own) with seeded random weights
    (N(0, 0.02), norm scales 1): finite activations, the same kernels and FLOPs as the released weights."""
    patcher = chains.build(arch, device=device, dtype=dtype, config=config)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in patcher.model.diffusion_model.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith(".scale")):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return patcher


def conditioning(arch: chains.Arch, device):
    """Positive / negative conditioning in ComfyUI's format, random, at the families' real widths."""
    gen = torch.Generator().manual_seed(1)
    context = chains.conds(arch, 1, device="cpu", dtype=torch.float32, fill=lambda shape: torch.randn(shape, generator=gen))
    extra = {"pooled_output": context["y"][:, :1280] if arch.name == "SDXL" else context["y"]}
    if "guidance" in context:
        extra["guidance"] = 3.5
    return [[context["c_crossattn"], dict(extra)]], [[context["c_crossattn"] * 0, dict(extra)]]


def timed_sampler(indices, times, device, deadline):
    """A KSAMPLER evaluating the model only at schedule steps `indices` (the first is a warm-up),
    with an Euler update from each to the next schedule sigma; appends each timed step's seconds
    and takes no further step once time.perf_counter() passes `deadline`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        for n, i in enumerate(indices):
            sync()
            start = time.perf_counter()
            denoised = model(x, sigmas[i] * s_in, **(extra_args or {}))
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            sync()
            if n:
                times.append(time.perf_counter() - start)
            if n and time.perf_counter() > deadline:
                break
        return x

    return comfy.samplers.KSAMPLER(sample)


def stratified(steps: int, count: int) -> list[int]:
    """A warm-up step and `count` steps spread over the schedule, each standing for steps/count."""
    picked = sorted({min(steps - 1, int((j + 0.5) * steps / count)) for j in range(count)})
    return [picked[0]] + picked


def resized(samplings, size, scale):
    """The final sampler at `size`, earlier ones (LR passes) scaled alike per side so that they keep the
    target's aspect ratio, every size divided by `scale` (CPU smoke mode)."""
    out = []
    final = samplings[-1]
    for s in samplings:
        w, h = round(s.width * size[0] / final.width), round(s.height * size[1] / final.height)
        out.append(chains.Sampling(s.name, s.arch, s.nodes, w // scale, h // scale, s.steps, s.cfg, s.sampler, s.scheduler))
    return out


def run_chain(patcher, arch, samplings, device, args, scale, deadline):
    positive, negative = conditioning(arch, device)
    overrides = {"UltraResPatchSplit": {"patch_size": arch.native // scale}} if scale > 1 else None
    outputs, per_sampler = [], []
    for s in samplings:
        model = chains.apply_chain(patcher.clone(), s, outputs, overrides)
        latent = torch.zeros(1, arch.channels, s.height // 8, s.width // 8)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), s.scheduler, s.steps)
        times = []
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(s.cfg)
        out = guider.sample(noise, latent, timed_sampler(stratified(s.steps, args.steps), times, device, deadline), sigmas,
                            disable_pbar=True, seed=0)
        outputs.append({"samples": out.float().cpu()})
        mean = sum(times) / len(times)
        per_sampler.append({"sampler": f"{s.name} {s.width * scale}x{s.height * scale}", "timed_steps": len(times),
                            "s_per_step": mean, "s_per_image": mean * s.steps, "finite": bool(torch.isfinite(out).all())})
    return per_sampler


def main(argv=None):
    global ARGS
    args = ARGS or parse(argv)
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu for the smoke mode")
    comfy.utils.PROGRESS_BAR_ENABLED = False
    scale = CPU_SCALE if args.cpu else 1
    configs = chains.tiny_configs() if args.cpu else {}
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    start = time.perf_counter()
    wanted = {k: v for k, v in chains.workflows(args.workflows.split(",") if args.workflows else None).items()
              if v[-1].arch in FAMILIES}
    results = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for family in FAMILIES:
        names = [w for w, samplings in wanted.items() if samplings[-1].arch == family]
        if not names:
            continue
        arch = chains.ARCHS[family]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # CPU smoke mode in float32: half-precision convolutions on a CPU are emulated and 50x slower
        patcher = random_model(arch, device, configs.get(family), None if device.type == "cuda" else torch.float32)
        if scale > 1:  # sizes are divided by `scale`: so is the native side the nodes check sizes against
            patcher.model.model_config.native_latent_size = arch.native // scale
        weights = sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters())
        for workflow in names:
            for size in sizes:
                entry = {"workflow": workflow, "size": f"{size[0]}x{size[1]}", "weights_gib": weights / 2**30}
                results.append(entry)
                if time.perf_counter() - start > args.budget - args.chain_budget:
                    entry["status"] = "skipped: run budget spent"
                    print(f"{workflow} {entry['size']}: skipped (budget)", flush=True)
                    continue
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                began = time.perf_counter()
                try:
                    samplers = run_chain(patcher, arch, resized(wanted[workflow], size, scale), device, args, scale,
                                         began + args.chain_budget)
                except Exception as e:  # untested hardware: record the chain and go on with the next
                    kind = "OOM" if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e) else type(e).__name__
                    entry["status"] = f"{kind}: {(str(e).splitlines() or [''])[0][:160]}"
                    print(f"{workflow} {entry['size']}: {entry['status']}", flush=True)
                    continue
                finally:
                    if device.type == "cuda":
                        entry["peak_vram_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                entry.update(status="ok", samplers=samplers, s_per_image=sum(s["s_per_image"] for s in samplers),
                             seconds=time.perf_counter() - began)
                line = ", ".join(f"{s['sampler']}: {s['s_per_step']:.2f} s/step" for s in samplers)
                vram = f", peak VRAM {entry['peak_vram_gib']:.1f} GiB (weights {entry['weights_gib']:.1f})" if "peak_vram_gib" in entry else ""
                print(f"{workflow} {entry['size']}: {line}; {entry['s_per_image']:.0f} s/image{vram}", flush=True)
        del patcher
    report = {"device": name, "dtype": {f: str(chains.ARCHS[f].dtype) for f in FAMILIES}, "cpu_smoke": args.cpu,
              "timed_steps": args.steps, "results": results, "seconds": time.perf_counter() - start}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
