"""Seconds per sampling step of the tiny FLUX with and without the URAE FLUX patch at the same size
(one run each after a warm-up): the overhead of the NTK embedder and the proportional-attention override.

    nice -n 10 /path/to/python tests/bench/urae_overhead.py --size 64 --steps 4 --json /tmp/urae_overhead.json
"""

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import host  # noqa: E402
import tiny_models  # noqa: E402
import torch  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="latent edge (tokens = (size/2)^2 image + 8 text)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()

    nodes = host.load_nodes()
    from ultrares.nodes.urae import URAEFlux

    base = tiny_models.tiny_flux()
    patched = host.run_node(URAEFlux, model=base, preset="2K (2048x2048)", ntk_factor=10.0, proportional_attention=True, sampling_shift=True)[0]
    g = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 8, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}]]
    latent = {"samples": torch.zeros(1, 16, args.size, args.size)}

    def seconds_per_step(model, steps):
        start = time.perf_counter()
        host.run_node(nodes["KSampler"], model=model, seed=0, steps=steps, cfg=1.0, sampler_name="euler", scheduler="simple",
                      positive=cond, negative=cond, latent_image=latent, denoise=1.0)
        return (time.perf_counter() - start) / steps

    seconds_per_step(base, 1)  # warm-up: model load, kernels
    seconds_per_step(patched, 1)
    result = {"latent": args.size, "image_tokens": (args.size // 2) ** 2, "steps": args.steps,
              "unpatched_s_per_step": seconds_per_step(base, args.steps),
              "patched_s_per_step": seconds_per_step(patched, args.steps)}
    result["overhead_ratio"] = result["patched_s_per_step"] / result["unpatched_s_per_step"]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
