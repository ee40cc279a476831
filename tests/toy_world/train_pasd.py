"""Train a tiny PASD for the frozen toy UNet: one command, seeded, on a CPU.

    .venv/bin/python tests/toy_world/train_pasd.py [--steps 2000] [--batch 8] [--crop 16] [--out-dir nodes/]

As the reference's train_pasd.py, on the toy SR task (tests/toy_world/sr_task.py):
- a ControlNet branch of ComfyUI's own ControlNet class (comfy.cldm.cldm), initialised from the toy UNet's
  encoder (ControlNetModel.from_unet), whose hint block is the degradation-removal module: its three
  stride-2 stages feed `to_rgbs` heads supervised with L1 against the HR picture at 1/2, 1/4, 1/8;
- full-PASD PACA layers (pixel_attentions after every decoder layer), run through the shipped patch
  (the same injection and handler as inference), the toy UNet frozen;
- epsilon loss on ComfyUI's discrete schedule, text (class) dropped for half the samples (null-text 0.5).
Trained on 16x16-latent crops of 4x-rendered scenes; the hint is the degraded low-res picture scaled
bicubically to the output size. Saved in the released diffusers layouts beside the toy world:
nodes/toy_pasd_unet.safetensors (toy base + up_blocks.i.pixel_attentions.j), nodes/toy_pasd_controlnet.safetensors
(controlnet_* keys, to_rgbs included), and the loss log nodes/toy_pasd.log.json.
"""

import argparse
import json
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import host  # noqa: E402, F401  (the real ComfyUI host on CPU, with the pack importable)
from toy_world import sr_task  # noqa: E402
from toy_world import train as toy_train  # noqa: E402

import comfy.cldm.cldm  # noqa: E402
import comfy.utils  # noqa: E402
import safetensors.torch  # noqa: E402
from ultrares.nodes import pasd as pasd_nodes  # noqa: E402
from ultrares.nodes import toy_world  # noqa: E402
from ultrares.patches import pasd  # noqa: E402

OUT_DIR = toy_world.WEIGHTS.parent
UNET_FILE, CONTROLNET_FILE, LOG_FILE = "toy_pasd_unet.safetensors", "toy_pasd_controlnet.safetensors", "toy_pasd.log.json"
CROP = 16  # latent px per training crop by default (a quarter of a 4x scene's side: ~0.8 s per step of 8 on one CPU thread)
RGB_STAGES = (5, 9, 13)  # input_hint_block indices of the SiLUs after the three stride-2 convs (32, 96, 256 channels)


def zero(module: torch.nn.Module) -> None:
    torch.nn.init.zeros_(module.weight)
    torch.nn.init.zeros_(module.bias)


def build(patcher, gen, init_dir: pathlib.Path | None = None):
    """ControlNet, to_rgbs heads and PACA layers: fresh (ControlNet from the UNet's encoder, PACA at the identity),
    or, with `init_dir`, an earlier run's saved files (to go on training them, e.g. on larger crops)."""
    config = dict(patcher.model.model_config.unet_config)
    config.pop("out_channels")
    net = comfy.cldm.cldm.ControlNet(**config, hint_channels=3)
    toy_train.init_weights(net, gen)  # the toy world's init (ComfyUI's ops skip PyTorch's)
    zero(net.input_hint_block[14])
    for m in list(net.zero_convs) + [net.middle_block_out]:
        zero(m[0])
    unet_sd = patcher.model.diffusion_model.state_dict()
    copied = {k: v for k, v in unet_sd.items() if k.split(".")[0] in ("input_blocks", "middle_block", "time_embed")}
    missing = set(copied) - set(net.state_dict())
    assert not missing, missing
    net.load_state_dict(copied, strict=False)  # from_unet: the encoder starts as the UNet's
    to_rgbs = torch.nn.ModuleList(torch.nn.Conv2d(c, 3, 3, padding=1) for c in (32, 96, 256))
    layers = pasd_nodes.decoder_of(patcher)
    paca = {l.index: pasd_nodes.PACALayer(l.index, l.channels, l.skip_channels) for l in layers}
    for m in paca.values():
        toy_train.init_weights(m, gen)  # zeroes proj_out: each PACA layer starts as the identity
    if init_dir is not None:
        cn = safetensors.torch.load_file(str(init_dir / CONTROLNET_FILE))
        mapping = pasd_nodes.diffusers_controlnet_keys(config, cn)
        net.load_state_dict({mapping[k]: v for k, v in cn.items() if not k.startswith(pasd_nodes.TRAINING_ONLY)}, strict=True)
        to_rgbs.load_state_dict({k[len(pasd_nodes.TRAINING_ONLY):]: v for k, v in cn.items() if k.startswith(pasd_nodes.TRAINING_ONLY)},
                                strict=True)
        saved = pasd.layer_state_dicts(safetensors.torch.load_file(str(init_dir / UNET_FILE)), pasd.FULL, layers)  # the loader's own split
        for l in layers:
            paca[l.index].transformer.load_state_dict(saved[l.index], strict=True)
    return net, to_rgbs, paca, config


def batch_of(batch, gen, crop=CROP):
    """(noisy-latent inputs ready: x0 crop, hint crop, HR crop image targets, class labels)."""
    gt, kinds = sr_task.ground_truth(batch, gen)
    lrs = sr_task.degrade(gt, gen)
    size = gt.shape[-1]
    x0, hints = [], []
    for i, lr in enumerate(lrs):
        full = sr_task.hint(lr, (size, size))
        y, x = (int(v) for v in torch.randint(0, size - crop + 1, (2,), generator=gen))
        x0.append(gt[i:i + 1, :, y:y + crop, x:x + crop])
        r = sr_task.RATIO
        hints.append(full[:, :, y * r:(y + crop) * r, x * r:(x + crop) * r])
    return torch.cat(x0), torch.cat(hints), kinds


def save(net, to_rgbs, paca, config, patcher, out_dir: pathlib.Path, metadata: dict):
    cn = pasd_nodes.controlnet_to_diffusers(config, {k: v.detach() for k, v in net.state_dict().items()})
    for i, head in enumerate(to_rgbs):
        cn[f"controlnet_cond_embedding.to_rgbs.{i}.weight"] = head.weight.detach()
        cn[f"controlnet_cond_embedding.to_rgbs.{i}.bias"] = head.bias.detach()
    inverse = {v: k for k, v in comfy.utils.unet_to_diffusers(dict(patcher.model.model_config.unet_config)).items()}
    unet = {inverse[k]: v for k, v in patcher.model.diffusion_model.state_dict().items()}  # the toy base, as the released file holds SD1.5's
    for l in pasd_nodes.decoder_of(patcher):
        for k, v in paca[l.index].transformer.state_dict().items():
            unet[f"up_blocks.{l.up_block}.pixel_attentions.{l.layer}.{k}"] = v.detach()
    meta = {k: str(v) for k, v in metadata.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in cn.items()}, str(out_dir / CONTROLNET_FILE), metadata=meta)
    safetensors.torch.save_file({k: v.contiguous() for k, v in unet.items()}, str(out_dir / UNET_FILE), metadata=meta)


def train(steps: int, batch: int, lr: float, seed: int, out_dir: pathlib.Path, rgb_weight: float = 1.0, crop: int = CROP,
          init_dir: pathlib.Path | None = None) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    unet_sd, embeddings = toy_world.load_weights(toy_world.WEIGHTS)
    patcher = toy_world.build_model(unet_sd)
    unet = patcher.model.diffusion_model.requires_grad_(False).eval()
    net, to_rgbs, paca, config = build(patcher, gen, init_dir)
    patched = pasd_nodes.with_paca(patcher, pasd.FULL, paca)
    patched.inject_model()  # the shipped injection: PACA layers inside the frozen UNet's decoder
    patches = patched.model_options["transformer_options"]["patches"]
    features = {}
    for i, idx in enumerate(RGB_STAGES):
        net.input_hint_block[idx].register_forward_hook(lambda m, a, out, i=i: features.__setitem__(i, out))
    params = list(net.parameters()) + list(to_rgbs.parameters()) + [p for m in paca.values() for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, min(50, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))
    sigmas = patcher.model.model_sampling.sigmas.float()
    n_classes = len(toy_world.SHAPES)
    log, started, running = [], time.monotonic(), None
    for step in range(1, steps + 1):
        x0_rgb, hint, kinds = batch_of(batch, gen, crop)
        x0 = toy_world.to_latent(x0_rgb)
        labels = torch.where(torch.rand(batch, generator=gen) < 0.5, n_classes, kinds)
        context = embeddings[labels]
        t = torch.randint(0, len(sigmas), (batch,), generator=gen)
        sigma = sigmas[t][:, None, None, None]
        eps = torch.randn(x0.shape, generator=gen)
        x_t = (x0 + sigma * eps) / torch.sqrt(sigma ** 2 + 1)
        control = net(x_t, hint, t.float(), context)
        options = {"patches": patches, pasd_nodes.CONTROL_KEY: list(control["output"])}
        pred = unet(x_t, timesteps=t.float(), context=context,
                    control={"input": [], "middle": list(control["middle"]), "output": list(control["output"])}, transformer_options=options)
        eps_loss = F.mse_loss(pred, eps)
        target = sr_task.to_image(x0_rgb) * 2 - 1
        rgb_loss = sum(F.l1_loss(head(features[i]), F.interpolate(target, size=features[i].shape[-2:], mode="bilinear", antialias=True))
                       for i, head in enumerate(to_rgbs))
        loss = eps_loss + rgb_weight * rgb_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running = (eps_loss.item(), rgb_loss.item()) if running is None else tuple(0.95 * r + 0.05 * v for r, v in zip(running, (eps_loss.item(), rgb_loss.item())))
        if step % 10 == 0 or step == steps:
            elapsed = time.monotonic() - started
            log.append({"step": step, "eps_loss": round(running[0], 5), "rgb_l1": round(running[1], 5), "seconds": round(elapsed, 1)})
            print(f"step {step}/{steps} eps {running[0]:.5f} rgb {running[1]:.5f} {elapsed:.0f}s", flush=True)
    patched.eject_model()
    summary = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "crop": crop, "init": str(init_dir or "fresh"), "final_eps_loss": log[-1]["eps_loss"],
               "final_rgb_l1": log[-1]["rgb_l1"], "seconds": log[-1]["seconds"], "threads": torch.get_num_threads()}
    save(net, to_rgbs, paca, config, patcher, out_dir, summary)
    (out_dir / LOG_FILE).write_text(json.dumps({"summary": summary, "log": log}, indent=1))
    print(json.dumps(summary))
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=pathlib.Path, default=OUT_DIR)
    p.add_argument("--crop", type=int, default=CROP, help="latent px per training crop")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a shared 2-core machine)")
    p.add_argument("--init-dir", type=pathlib.Path, help="start from the toy PASD files of an earlier run in this folder (default: fresh)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)  # here, not in train(): a test calling train() keeps its own threads
    train(a.steps, a.batch, a.lr, a.seed, a.out_dir, crop=a.crop, init_dir=a.init_dir)


if __name__ == "__main__":
    main()
