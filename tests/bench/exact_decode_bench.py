"""Exact Tiled VAE Decode vs VAE Decode vs VAE Decode (Tiled) on the FLUX VAE in its released layout
(ComfyUI's own detection builds it; weights random but fixed): seconds (each method in its own process, the same
thread count), exact / tiled time ratio, peak RSS growth, peak live tensor bytes (--probe), and the
largest pixel difference from the full decode.

Device vs host bytes (--account): the exact decode of the real SDXL and FLUX decoder architectures at
full size in bf16, run on the meta device (shapes only, no compute) with every tensor the decode sends
to the state side tagged; peaks of live bytes per side, plus the weights for the device, beside the
planner's figures.

    nice -n 10 .venv/bin/python tests/bench/exact_decode_bench.py --sizes 512,1024 --tile 256 --account 2048,4096,8192 --json /tmp/exact_decode.json
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

METHODS = ("full", "tiled", "exact")


def flux_vae():
    import tiny_models

    vae = tiny_models.released_vae("flux")
    tiny_models.init_parameters(vae.first_stage_model.decoder, 0)
    return vae


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Samples the resident set every 2 ms while the block runs."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())


def child(method: str, size: int, tile: int, out: str, probe: bool):
    import host
    import safetensors.torch
    import torch
    from tensor_memory import PeakTensorMemory

    nodes = host.load_nodes()
    from ultrares.nodes.exact_decode import ExactVAEDecode

    vae = flux_vae()
    latent = {"samples": torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0))}
    run = {
        "full": lambda: host.run_node(nodes["VAEDecode"], vae=vae, samples=latent),
        "tiled": lambda: host.run_node(nodes["VAEDecodeTiled"], vae=vae, samples=latent, tile_size=tile, overlap=64, temporal_size=64, temporal_overlap=8),
        "exact": lambda: host.run_node(ExactVAEDecode, vae=vae, samples=latent, tile_size=tile, layer_memory="auto"),
    }[method]
    with torch.inference_mode():
        if probe:
            with PeakTensorMemory() as tensors:
                image = run()[0]
            result = {"peak_tensor_bytes": tensors.peak}
        else:
            with PeakRSS() as rss:
                start = time.perf_counter()
                image = run()[0]
                seconds = time.perf_counter() - start
            result = {"seconds": seconds, "peak_rss_growth_bytes": rss.peak - rss.base}
    safetensors.torch.save_file({"image": image.contiguous()}, out)
    print("RESULT " + json.dumps(result))


FAMILIES = ("sdxl", "flux")  # their decoders differ only in conv_in


def decode_flops(decoder, z, tile: int, overlap: int = 64) -> dict:
    """Model FLOPs (torch's FlopCounterMode: convolutions and matmuls) of the full decode and of VAE Decode
    (Tiled): comfy.utils.tiled_scale over its three tile shapes, as VAE.decode_tiled_ runs them (shapes only;
    each tile shape is counted once and multiplied)."""
    import comfy.utils
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def counted(t):
        with FlopCounterMode(display=False) as mode:
            out = decoder(t)
        return mode.get_total_flops(), out

    full, _ = counted(z)
    per_shape, tiled = {}, [0]

    def tile_fn(t):
        key = tuple(t.shape)
        if key not in per_shape:
            per_shape[key] = counted(t)
        tiled[0] += per_shape[key][0]
        return torch.empty_like(per_shape[key][1])

    edge, lap = tile // 8, overlap // 8
    for tile_x, tile_y in ((edge // 2, edge * 2), (edge * 2, edge // 2), (edge, edge)):
        comfy.utils.tiled_scale(z, tile_fn, tile_x, tile_y, lap, upscale_amount=8, output_device="meta")
    return {"full": full, "tiled": tiled[0]}


def accounted(vae: str, size: int, tile: int) -> dict:
    """Peak live bytes per side of the exact decode of a `size` px square, bf16, shapes only."""
    import host  # noqa: F401
    import tiny_models
    import torch
    from tensor_memory import PeakTensorMemory, TaggedPlacement
    from torch.utils.flop_counter import FlopCounterMode
    from ultrares.patches.exact_decode import exact_decode, plan

    decoder = tiny_models.released_vae(vae).first_stage_model.decoder.to(device="meta", dtype=torch.bfloat16)
    channels = decoder.conv_in.in_channels
    z = torch.empty(1, channels, size // 8, size // 8, device="meta", dtype=torch.bfloat16)
    start = time.perf_counter()
    with FlopCounterMode(display=False) as flops, PeakTensorMemory(meta=True) as probe:
        exact_decode(decoder, z, tile, TaggedPlacement(probe, "meta"))
    weights = sum(p.numel() * p.element_size() for p in decoder.parameters())
    planned = plan(decoder, z.shape, tile, torch.bfloat16)
    return {"flops": {"exact": flops.get_total_flops(), **decode_flops(decoder, z, tile)}, "device_bytes": probe.peaks["meta"] + weights, "device_tiles_bytes": probe.peaks["meta"], "weight_bytes": weights,
            "host_bytes": probe.peaks["state"], "planned_tile_bytes": planned.tile_bytes, "planned_state_bytes": planned.state_bytes,
            "tiles": planned.tiles, "accounting_seconds": round(time.perf_counter() - start, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512", help="output edges in pixels, comma separated")
    parser.add_argument("--tile", type=int, default=256, help="tile edge in pixels for both tiled decodes")
    parser.add_argument("--probe", action="store_true", help="also count peak live tensor bytes (a separate, slower run)")
    parser.add_argument("--account", default="", help="sizes in px for the device vs host accounting, comma separated")
    parser.add_argument("--account-tile", type=int, default=512, help="tile edge of the accounting (the node's default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every timed process")
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "SIZE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child[0], int(args.child[1]), args.tile, args.child[2], args.child_probe)

    import safetensors.torch

    results = {"tile": args.tile, "threads": args.threads, "sizes": {}, "account_tile": args.account_tile, "accounting": {}}
    gib = 2 ** 30
    for size in (int(s) for s in args.account.split(",") if s):
        for vae in FAMILIES:
            row = accounted(vae, size, args.account_tile)
            results["accounting"].setdefault(vae, {})[size] = row
            print(f"{vae} {size} px tile {args.account_tile}: device {row['device_bytes'] / gib:.2f} GiB (tiles "
                  f"{row['device_tiles_bytes'] / gib:.2f} + weights {row['weight_bytes'] / gib:.2f}), host {row['host_bytes'] / gib:.2f} GiB; "
                  f"planned tile {row['planned_tile_bytes'] / gib:.2f}, state {row['planned_state_bytes'] / gib:.2f} GiB; "
                  f"TFLOP full {row['flops']['full'] / 1e12:.1f}, tiled {row['flops']['tiled'] / 1e12:.1f}, exact {row['flops']['exact'] / 1e12:.1f}", flush=True)
            save(results, args.json)
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",") if s):
            row = {}
            for method in METHODS:
                for probe in (False, True) if args.probe else (False,):
                    out = f"{tmp}/{method}_{size}.safetensors"
                    cmd = [sys.executable, __file__, "--tile", str(args.tile), "--threads", str(args.threads), "--child", method, str(size), out] + (["--child-probe"] if probe else [])
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
                    if res.returncode != 0 or not line:
                        raise RuntimeError(f"{method} {size}: {res.stderr[-2000:]}")
                    row.setdefault(method, {}).update(json.loads(line[0][len("RESULT "):]))
                    print(size, method, row[method], flush=True)
            full = safetensors.torch.load_file(f"{tmp}/full_{size}.safetensors")["image"]
            for method in METHODS:
                image = safetensors.torch.load_file(f"{tmp}/{method}_{size}.safetensors")["image"]
                row[method]["max_abs_diff_vs_full"] = float((image - full).abs().max())
            row["exact_over_tiled_time"] = row["exact"]["seconds"] / row["tiled"]["seconds"]
            print(size, f"exact / tiled time {row['exact_over_tiled_time']:.2f}", flush=True)
            results["sizes"][size] = row
            save(results, args.json)  # after every size: a long run stopped early keeps what it measured
    print(json.dumps(results, indent=2))
    save(results, args.json)


def save(results, path):
    if path:
        path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
