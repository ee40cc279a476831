"""Train the toy StageC (nodes/toy_cascade.safetensors) and then its UltraPixel guidance modules
(nodes/toy_cascade_ultrapixel.safetensors, in the released module.64.j / module.65.j layout): one
seeded command each, on a CPU.

    .venv/bin/python tests/toy_world/train_cascade.py base      [--steps N]   # ComfyUI's StageC class, native 32x32 (10000 x 16)
    .venv/bin/python tests/toy_world/train_cascade.py guidance  [--steps N]   # the four TransInr, base frozen (600 x 8)
    .venv/bin/python tests/toy_world/train_cascade.py base --init F [--steps N] [--lr L] [--seed S]   # go on from base file F
The shipped base is `base` (defaults) then `base --init nodes/toy_cascade.safetensors --steps 5000 --lr 3e-4 --seed 1`.

base: epsilon prediction on the StageC schedule (StableCascadeSampling, shift 1: t ~ U(0, 1),
sigma(t), input x / sqrt(sigma^2 + 1), r = t), class tokens as CLIP text tokens and their mean as
the pooled vector, 10% unconditional (for CFG); EMA weights shipped.

guidance: UltraPixel's recipe (train_t2i.py::forward_pass): an HR scene (the toy world drawn at 2x or
4x), its LR picture (the same scene averaged down to the native 32x32), the LR latent noised at the
fixed t = 0.05 and run through the frozen StageC under no_grad to record the four features; the HR
latent noised at a random t and predicted with the guides added (up path at weight 1, as in
training); MSE in eps space. Only the modules learn.

Both print the loss every 50 steps, write <out>.log.json beside the weights, and use one torch
thread (on a shared 2-core machine one thread is several times faster than two).
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
import host  # noqa: E402,F401  (the real ComfyUI host on CPU, with the pack importable)
from toy_world import scenes  # noqa: E402

import safetensors.torch  # noqa: E402
from ultrares.nodes import toy_cascade, toy_world, ultrapixel  # noqa: E402
from ultrares.patches import ultrapixel as up  # noqa: E402

LR_T = 0.05  # the reference's fixed LR noise level
HR_SCALES = (2, 4)  # HR scenes per step, alternating (the benchmark samples 4x)
EMA_DECAY = 0.995  # short CPU runs: 0.999 would still average in the first few hundred steps
EMBED_BIAS = 20.0  # the constant direction's size in the embedding (values per patch: 16)
GELU_OFFSET = 4.0  # keeps the skip path in GELU's linear regime
DEEP_SCALE = 0.01  # the deep path's upscaler starts this small (near-identity at init)


def init_stage_c(unet: torch.nn.Module, gen: torch.Generator, embed_bias: float = EMBED_BIAS, deep_scale: float = DEEP_SCALE) -> None:
    """PyTorch's default init (ComfyUI's ops skip it) from a seeded generator; GRN and the output conv start at zero."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    done = set()
    for m in unet.modules():
        for base in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.LayerNorm):
            if isinstance(m, base):
                base.reset_parameters(m)
                done.update(id(p) for p in m.parameters(recurse=False))
    with torch.no_grad():
        for p in unet.parameters():
            if id(p) not in done:  # GlobalResponseNorm gamma / beta
                p.zero_()
        unet.clf[1].weight.zero_()
        unet.clf[1].bias.zero_()
        identity_init(unet, gen, embed_bias, deep_scale)


def identity_init(unet: torch.nn.Module, gen: torch.Generator, embed_bias: float = EMBED_BIAS, deep_scale: float = DEEP_SCALE) -> None:
    """Start the StageC at eps_pred = its input, the exact answer at high noise (x / sqrt(sigma^2 + 1) -> eps).

    StageC has no input-to-output skip and its embedding ends in a LayerNorm without affine; eps prediction at
    sigma ~100 needs the identity to ~1e-2 (x0 = x - sigma eps). So: the embedding maps each patch to an
    orthonormal subspace plus a large constant direction u (orthogonal to it and to the mean), which keeps the
    LayerNorm nearly linear and invertible; every residual branch of the shallow level and the deep path's
    upscaler start at zero; the up path's first ResBlock carries its skip (the embedding) through the linear
    regime of its GELU; the output conv inverts the embedding.
    """
    c, p = unet.embedding[1].weight.shape[:2]
    assert c >= p + 2, "the shallow width must exceed the values per patch by 2"
    basis = torch.linalg.qr(torch.cat([torch.ones(c, 1), torch.randn(c, p + 1, generator=gen)], 1))[0][:, 1:]
    q, u = basis[:, :p], basis[:, p]
    with torch.no_grad():
        unet.embedding[1].weight.copy_(q[:, :, None, None])
        unet.embedding[1].bias.copy_(embed_bias * u)
        for level in (unet.down_blocks[0], unet.up_blocks[-1]):
            for block in level:
                if hasattr(block, "channelwise"):
                    block.channelwise[-1].weight.zero_()
                    block.channelwise[-1].bias.zero_()
                elif hasattr(block, "attention"):
                    block.attention.attn.out_proj.weight.zero_()
                    block.attention.attn.out_proj.bias.zero_()
                else:  # TimestepBlock: x * (1 + a) + b starts at a = b = 0
                    for m in block.modules():
                        if isinstance(m, torch.nn.Linear):
                            m.weight.zero_()
                            m.bias.zero_()
        up_conv = unet.up_upscalers[0][1].blocks[1]
        up_conv.weight.mul_(deep_scale)
        up_conv.bias.zero_()
        first = unet.up_blocks[-1][0].channelwise
        first[0].weight[:c].zero_()
        first[0].weight[:c, c:].copy_(torch.eye(c))
        first[0].bias[:c].fill_(GELU_OFFSET)
        first[-1].weight[:, :c].copy_(torch.eye(c))
        first[-1].bias.fill_(-GELU_OFFSET)
        unet.clf[1].weight.copy_((embed_bias / math.sqrt(c)) * q.T[:, :, None, None])
        unet.clf[1].bias.zero_()


def init_modules(modules: torch.nn.Module, gen: torch.Generator) -> None:
    """Default init, the reference's random position embedding / weight tokens / base weights, and the
    scale-aware output x (2 + a) + b (ScaleNorm: Modulation plus x) at a = -2, b = 0, so training starts from the unguided StageC.
    (Zeroing the fusion's last layer does not: the LayerNorm after it turns the timestep bias into a unit-size
    guide; here the LayerNorm's input stays non-degenerate and every layer gets gradients through a.)"""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    with torch.no_grad():
        for m in modules.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.xavier_uniform_(m.weight)
                torch.nn.init.zeros_(m.bias)
            elif isinstance(m, torch.nn.LayerNorm):
                torch.nn.LayerNorm.reset_parameters(m)
        for inr in (m for m in modules.modules() if isinstance(m, up.TransInr)):
            inr.tokenizer.posemb.normal_()
            inr.wtokens.normal_()
            for name, p in inr.base_params.items():
                torch.nn.init.kaiming_uniform_(p[:-1].T, a=math.sqrt(5))  # (out, in) like a Linear weight
                p[-1].uniform_(-1 / math.sqrt(p.shape[0] - 1), 1 / math.sqrt(p.shape[0] - 1))
            out = inr.hr_norm.mapping.mapper
            out.weight.zero_()
            out.bias.zero_()
            out.bias[:inr.shape.ind] = -2.0


def noised(x0, t, sampling, gen):
    sigma = sampling.sigma(t)[:, None, None, None]
    eps = torch.randn(x0.shape, generator=gen)
    return (x0 + sigma * eps) / torch.sqrt(sigma ** 2 + 1), eps


def stage_c_call(unet, x, t, tokens, **options):
    return unet(x, t, clip_text=tokens, clip_text_pooled=tokens.mean(1, keepdim=True),
                clip_img=torch.zeros(x.shape[0], 1, 768), transformer_options=options)


def ema_update(ema: dict, live: dict, step: int) -> None:
    decay = min(EMA_DECAY, (1 + step) / (10 + step))
    with torch.no_grad():
        for k, v in live.items():
            ema[k].mul_(decay).add_(v, alpha=1 - decay)


def schedule(opt, steps):
    warmup = max(1, min(200, steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))


def optimise(loss, params, opt, sched) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def write(tensors: dict, out: pathlib.Path, summary: dict, log: list) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(out),
                                metadata={k: str(v) for k, v in summary.items()})
    out.with_suffix(".log.json").write_text(json.dumps({"summary": summary, "log": log}, indent=1) + "\n")
    print(json.dumps(summary), flush=True)


def train_base(steps: int, batch: int, lr: float, seed: int, out: pathlib.Path, embed_bias: float = EMBED_BIAS,
               t_max: float = 1.0, deep_scale: float = DEEP_SCALE, init: pathlib.Path | None = None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n_classes = len(toy_world.SHAPES)
    if init is None:
        patcher = toy_cascade.build_model()
        init_stage_c(patcher.model.diffusion_model, gen, embed_bias, deep_scale)
        start = torch.randn(n_classes + 1, toy_world.CONTEXT_TOKENS, toy_world.CONTEXT_DIM, generator=gen)
    else:  # go on from an earlier run's (EMA) weights and embeddings
        patcher, start = toy_cascade.load(init)
    unet, sampling = patcher.model.diffusion_model, patcher.model.model_sampling
    embeddings = torch.nn.Parameter(start.clone())
    params = list(unet.parameters()) + [embeddings]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = schedule(opt, steps)
    ema = copy.deepcopy(dict(unet.state_dict(), **{toy_world.EMBEDDINGS_KEY: embeddings.detach()}))
    unet.train()
    log, started, running = [], time.monotonic(), None
    for step in range(1, steps + 1):
        rgb, kinds = scenes.sample(batch, gen)
        labels = torch.where(torch.rand(batch, generator=gen) < 0.1, n_classes, kinds)
        t = t_max * torch.rand(batch, generator=gen)
        x_t, eps = noised(toy_world.to_latent(rgb), t, sampling, gen)
        loss = torch.nn.functional.mse_loss(stage_c_call(unet, x_t, t, embeddings[labels]), eps)
        optimise(loss, params, opt, sched)
        ema_update(ema, dict(unet.state_dict(), **{toy_world.EMBEDDINGS_KEY: embeddings.detach()}), step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps:
            log.append({"step": step, "loss": round(running, 5), "seconds": round(time.monotonic() - started, 1)})
            print(f"step {step}/{steps} loss {running:.5f} {log[-1]['seconds']:.0f}s", flush=True)
    summary = {"phase": "base", "steps": steps, "batch": batch, "lr": lr, "seed": seed, "embed_bias": embed_bias, "t_max": t_max,
               "deep_scale": deep_scale, "init": str(init) if init else None,
               "final_loss": log[-1]["loss"],
               "seconds": log[-1]["seconds"], "threads": torch.get_num_threads()}
    write(ema, out, summary, log)
    return summary


def module_shapes(ind: int) -> dict:
    """The toy modules: the released architecture at width 32, position embedding for the native LR grid."""
    native = toy_cascade.NATIVE // toy_cascade.PATCH
    shape = up.TransInrShape(ind=ind, ch=64, tokens=native * native, ff_dim=64, pe_features=256, hidden=64,
                             groups=(64, 64), time_dim=64, scale_dim=64, fuse_dim=ind // 4)
    return {key: shape for key in up.HOOKS}


def train_guidance(steps: int, batch: int, lr: float, seed: int, out: pathlib.Path, base: pathlib.Path) -> dict:
    gen = torch.Generator().manual_seed(seed)
    patcher, embeddings = toy_cascade.load(base)
    unet, sampling = patcher.model.diffusion_model, patcher.model.model_sampling
    unet.requires_grad_(False)
    std = ultrapixel.native_profile(patcher).std_tokens  # the scale embedding's reference, as the UltraPixel Loader builds it
    modules = up.UltraPixelModules(module_shapes(toy_cascade.STAGE_C["c_hidden"][0]), std_tokens=std)
    init_modules(modules, gen)
    features = up.LRFeatures()
    r_of = lambda options, b: options["r"]  # training: each sample its own t
    blocks = {key: getattr(unet, key[0])[key[1]][up.HOOK_BLOCK] for key in up.HOOKS}
    originals = {key: b.forward for key, b in blocks.items()}
    params = list(modules.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = schedule(opt, steps)
    ema = copy.deepcopy(modules.state_dict())
    log, started, running = [], time.monotonic(), None
    n_classes = len(toy_world.SHAPES)
    try:
        for step in range(1, steps + 1):
            scale = HR_SCALES[step % len(HR_SCALES)]
            rgb, kinds = scenes.sample(batch, gen, scale=scale)
            hr = toy_world.to_latent(rgb)
            lr_pic = torch.nn.functional.avg_pool2d(hr, scale)
            labels = torch.where(torch.rand(batch, generator=gen) < 0.1, n_classes, kinds)
            tokens = embeddings[labels]
            with torch.no_grad():  # the LR features at t = 0.05 (cond only: the label is the prompt)
                t_lr = torch.full((batch,), LR_T)
                x_lr, _ = noised(lr_pic, t_lr, sampling, gen)
                for key, b in blocks.items():
                    b.forward = up.GuidedBlock(originals[key], key, features, r_of, record_sigma=float(sampling.sigma(t_lr[:1])))
                stage_c_call(unet, x_lr, t_lr, tokens, sigmas=sampling.sigma(t_lr), cond_or_uncond=[0])
            t = torch.rand(batch, generator=gen)
            x_t, eps = noised(hr, t, sampling, gen)
            for key, b in blocks.items():  # training mode: every guide at weight 1
                b.forward = up.GuidedBlock(originals[key], key, features, r_of, modules.at(*key), lambda h, w: 1.0)
            pred = stage_c_call(unet, x_t, t, tokens, r=t, cond_or_uncond=[0])
            loss = torch.nn.functional.mse_loss(pred, eps)
            optimise(loss, params, opt, sched)
            ema_update(ema, modules.state_dict(), step)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % 50 == 0 or step == steps:
                log.append({"step": step, "loss": round(running, 5), "seconds": round(time.monotonic() - started, 1)})
                print(f"step {step}/{steps} loss {running:.5f} {log[-1]['seconds']:.0f}s", flush=True)
    finally:
        for key, b in blocks.items():
            del b.forward
    released = {f"module.{'64' if k.startswith('agg_net.') else '65'}.{k.split('.', 1)[1]}": v for k, v in ema.items()}
    summary = {"phase": "guidance", "steps": steps, "batch": batch, "lr": lr, "seed": seed, "hr_scales": list(HR_SCALES),
               "lr_t": LR_T, "final_loss": log[-1]["loss"], "seconds": log[-1]["seconds"], "threads": torch.get_num_threads()}
    write(released, out, summary, log)
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("base", "guidance"))
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path)
    p.add_argument("--base", type=pathlib.Path, default=toy_cascade.WEIGHTS, help="guidance: the trained toy StageC")
    p.add_argument("--embed-bias", type=float, default=EMBED_BIAS, help="base: the identity init's constant direction")
    p.add_argument("--t-max", type=float, default=1.0, help="base: train on t ~ U(0, t_max) (sampling at denoise 0.9 starts near t = 0.91)")
    p.add_argument("--deep-scale", type=float, default=DEEP_SCALE, help="base: the deep path's upscaler's initial scale")
    p.add_argument("--init", type=pathlib.Path, help="base: go on from this earlier base file instead of a fresh init")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.phase == "base":
        train_base(a.steps or 10000, a.batch or 16, a.lr, a.seed, a.out or toy_cascade.WEIGHTS, a.embed_bias, a.t_max, a.deep_scale, a.init)
    else:
        train_guidance(a.steps or 600, a.batch or 8, a.lr, a.seed, a.out or toy_cascade.ULTRAPIXEL_WEIGHTS, a.base)


if __name__ == "__main__":
    main()
