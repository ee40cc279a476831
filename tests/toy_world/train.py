"""Train the toy world (nodes/toy_world.safetensors): one command, seeded, reproducible on a CPU.

    .venv/bin/python tests/toy_world/train.py [--steps N] [--out PATH]

Epsilon prediction on ComfyUI's discrete scaled-linear schedule (the model's own model_sampling),
class conditioning through cross-attention with a learned embedding per shape and one
unconditional embedding (dropped in for 10% of samples, for CFG). The shipped file holds the EMA
weights. Prints the loss every 100 steps and the wall time at the end.
"""

import argparse
import copy
import json
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import host  # noqa: E402, F401  (the real ComfyUI host on CPU, with the pack importable)
from toy_world import scenes  # noqa: E402

import safetensors.torch  # noqa: E402
from ultrares.nodes import toy_world  # noqa: E402


def init_weights(unet: torch.nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default init (ComfyUI's ops skip it) from a seeded generator; residual outputs start at zero."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    for name, m in unet.named_modules():
        for base in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(m, base):
                base.reset_parameters(m)
        if name == "out.2" or name.endswith(("out_layers.3", "proj_out")):
            torch.nn.init.zeros_(m.weight)
            torch.nn.init.zeros_(m.bias)


def save(ema: dict, path: pathlib.Path, metadata: dict) -> None:
    tensors = {k: v.contiguous() for k, v in ema["unet"].items()}
    tensors[toy_world.EMBEDDINGS_KEY] = ema["embeddings"].contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata={k: str(v) for k, v in metadata.items()})


def train(steps: int, batch: int, lr: float, seed: int, out: pathlib.Path, snapshot_every: int = 0) -> dict:
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(seed)
    patcher = toy_world.build_model()
    unet = patcher.model.diffusion_model
    init_weights(unet, gen)
    n_classes = len(toy_world.SHAPES)
    embeddings = torch.nn.Parameter(torch.randn(n_classes + 1, toy_world.CONTEXT_TOKENS, toy_world.CONTEXT_DIM, generator=gen))
    params = list(unet.parameters()) + [embeddings]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, min(200, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))
    ema = copy.deepcopy({"unet": unet.state_dict(), "embeddings": embeddings.detach()})
    sigmas = patcher.model.model_sampling.sigmas.float()  # ComfyUI's own schedule: sigma_t = sqrt((1 - abar_t) / abar_t)
    unet.train()
    log, started = [], time.monotonic()
    running = None
    for step in range(1, steps + 1):
        rgb, kinds = scenes.sample(batch, gen)
        x0 = toy_world.to_latent(rgb)
        drop = torch.rand(batch, generator=gen) < 0.1
        labels = torch.where(drop, n_classes, kinds)
        t = torch.randint(0, len(sigmas), (batch,), generator=gen)
        sigma = sigmas[t][:, None, None, None]
        eps = torch.randn(x0.shape, generator=gen)
        x_t = (x0 + sigma * eps) / torch.sqrt(sigma ** 2 + 1)  # what ComfyUI's EPS model feeds the UNet
        pred = unet(x_t, timesteps=t.float(), context=embeddings[labels])
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema["unet"][k].mul_(decay).add_(v, alpha=1 - decay)
            ema["embeddings"].mul_(decay).add_(embeddings.detach(), alpha=1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps:
            elapsed = time.monotonic() - started
            log.append({"step": step, "loss": round(running, 5), "seconds": round(elapsed, 1)})
            print(f"step {step}/{steps} loss {running:.5f} {elapsed:.0f}s", flush=True)
        if snapshot_every and step % snapshot_every == 0 and step < steps:
            save(ema, out.with_name(f"{out.stem}.step{step}.safetensors"), {"step": step})
    summary = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "final_loss": log[-1]["loss"],
               "seconds": log[-1]["seconds"], "threads": torch.get_num_threads()}
    save(ema, out, summary)
    out.with_suffix(".log.json").write_text(json.dumps({"summary": summary, "log": log}, indent=1))
    print(json.dumps(summary))
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=toy_world.WEIGHTS)
    p.add_argument("--snapshot-every", type=int, default=0, help="also save EMA snapshots beside --out every N steps")
    a = p.parse_args()
    train(a.steps, a.batch, a.lr, a.seed, a.out, a.snapshot_every)


if __name__ == "__main__":
    main()
