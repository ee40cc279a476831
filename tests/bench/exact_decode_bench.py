"""Exact Tiled VAE Decode vs VAE Decode vs VAE Decode (Tiled) on the FLUX VAE architecture (ComfyUI's
own detection builds it; weights random but fixed): seconds, peak RSS growth during the decode (each
method in its own process), peak live tensor bytes (--probe), and the largest pixel difference from
the full decode. Also prints the exact decode's planned memory at 2K/4K in bf16.

    nice -n 10 /path/to/python tests/bench/exact_decode_bench.py --sizes 512 --tile 256 --probe --json /tmp/exact_decode.json
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
    import comfy.sd
    import tiny_models
    import torch

    vae = comfy.sd.VAE(sd={"decoder.conv_in.weight": torch.zeros(512, 16, 3, 3)})
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


def planned(sizes=(2048, 4096)):
    import host  # noqa: F401
    import torch
    from comfy.ldm.modules.diffusionmodules.model import Decoder
    from ultrares.patches.exact_decode import plan

    config = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        decoder = Decoder(**config)
    return {size: plan(decoder, (1, 16, size // 8, size // 8), 512, torch.bfloat16).__dict__ for size in sizes}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512", help="output edges in pixels, comma separated")
    parser.add_argument("--tile", type=int, default=256, help="tile edge in pixels for both tiled decodes")
    parser.add_argument("--probe", action="store_true", help="also count peak live tensor bytes (a separate, slower run)")
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "SIZE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), args.tile, args.child[2], args.child_probe)

    import safetensors.torch

    results = {"tile": args.tile, "sizes": {}, "planned_exact_bf16_tile512": planned()}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            row = {}
            for method in METHODS:
                for probe in (False, True) if args.probe else (False,):
                    out = f"{tmp}/{method}_{size}.safetensors"
                    cmd = [sys.executable, __file__, "--tile", str(args.tile), "--child", method, str(size), out] + (["--child-probe"] if probe else [])
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
            results["sizes"][size] = row
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
