"""The toy StageC and its UltraPixel modules (tests/toy_world/train_cascade.py): the training commands run
and save what the UltraPixel Loader reads, the guidance starts as the unguided StageC, and the benchmark
runs on the shipped toy."""

import math
import pathlib
import sys

import pytest
import torch

import host
from toy_world import train_cascade
from ultrares.nodes import toy_cascade, toy_world
from ultrares.nodes import ultrapixel as node
from ultrares.patches import ultrapixel as up

import folder_paths


def test_guidance_modules_start_as_the_unguided_stage_c():
    std = node.Profile(*toy_cascade.ToyCascadeConfig.ultrapixel_profile).std_tokens
    modules = up.UltraPixelModules(train_cascade.module_shapes(toy_cascade.STAGE_C["c_hidden"][0]), std_tokens=std)
    train_cascade.init_modules(modules, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    for key in up.HOOKS:
        width = modules.at(*key).shape.ind
        guide = modules.at(*key)(torch.randn(2, width, 32, 32, generator=gen), torch.randn(2, width, 16, 16, generator=gen),
                                 up.sinusoid(torch.tensor([0.3, 0.8]), modules.at(*key).shape.time_dim))
        assert torch.equal(guide, torch.zeros_like(guide)), key
    # and it learns: the gradient reaches the scale-aware output (the only zeroed layer)
    m = modules.at("up_blocks", 0)
    guide = m(torch.randn(1, m.shape.ind, 8, 8, generator=gen), torch.randn(1, m.shape.ind, 4, 4, generator=gen),
              up.sinusoid(torch.tensor([0.5]), m.shape.time_dim))
    guide.square().add(guide).sum().backward()
    assert m.hr_norm.mapping.mapper.bias.grad.abs().sum() > 0


def test_training_commands_save_weights_that_the_loaders_read(tmp_path):
    base = tmp_path / "base.safetensors"
    summary = train_cascade.train_base(steps=2, batch=2, lr=1e-3, seed=0, out=base)
    assert summary["steps"] == 2 and base.with_suffix(".log.json").is_file()
    patcher, embeddings = toy_cascade.load(base)
    assert embeddings.shape[0] == len(toy_world.SHAPES) + 1
    modules_file = tmp_path / "modules.safetensors"
    train_cascade.train_guidance(steps=1, batch=1, lr=1e-3, seed=0, out=modules_file, base=base)
    folder = pathlib.Path(folder_paths.get_folder_paths(node.FOLDER)[0])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "smoke_toy_modules.safetensors").write_bytes(modules_file.read_bytes())
    loaded = host.run_node(node.UltraPixelLoader, model=patcher, ultrapixel_name="smoke_toy_modules.safetensors")[0]
    assert loaded.get_attachment(node.KEY).max_tokens == (toy_cascade.NATIVE // toy_cascade.PATCH) ** 2


def test_base_training_goes_on_from_an_earlier_file(tmp_path):
    """`--init`: the run starts from that file's weights and embeddings (at lr 0 it hands them back unchanged)."""
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    train_cascade.train_base(steps=2, batch=2, lr=1e-3, seed=0, out=first)
    summary = train_cascade.train_base(steps=1, batch=2, lr=0.0, seed=1, out=second, init=first)
    assert summary["init"] == str(first)
    (a, emb_a), (b, emb_b) = toy_cascade.load(first), toy_cascade.load(second)
    assert torch.equal(emb_a, emb_b)
    sd_a, sd_b = a.model.diffusion_model.state_dict(), b.model.diffusion_model.state_dict()
    assert all(torch.allclose(sd_a[k], sd_b[k], rtol=1e-6, atol=1e-7) for k in sd_a)  # the EMA's rounding only
    fresh, _ = toy_cascade.load(first)  # and a fresh init differs from it, so the check can fail
    train_cascade.init_stage_c(fresh.model.diffusion_model, torch.Generator().manual_seed(5))
    assert not all(torch.equal(sd_a[k], v) for k, v in fresh.model.diffusion_model.state_dict().items())


def test_attention_probe_reads_the_share_on_the_clip_tokens(tmp_path, monkeypatch):
    sys.path.insert(0, str(pathlib.Path(__file__).parent / "toy_world"))
    import check_cascade

    for self_attn in (True, False):
        monkeypatch.setitem(toy_cascade.STAGE_C, "self_attn", self_attn)
        base = tmp_path / f"base_{self_attn}.safetensors"
        train_cascade.train_base(steps=2, batch=2, lr=1e-3, seed=0, out=base)
        rows = check_cascade.attention_mass(base, scenes_n=2)
        assert len(rows) == len(check_cascade.X0_SIGMAS) * 4  # four AttnBlocks at each sigma
        masses = torch.tensor([r[2:4] for r in rows])
        if self_attn:  # the spatial keys take a share
            assert (masses > 0).all() and (masses < 1).all()
        else:  # cross-attention only: every query's mass is on the clip tokens
            assert torch.allclose(masses, torch.ones_like(masses), atol=1e-5)


def test_shrinkage_probe_reads_the_toy_sd_unet_as_keeping_contrast(tmp_path):
    sys.path.insert(0, str(pathlib.Path(__file__).parent / "toy_world"))
    import check_cascade

    base = tmp_path / "base.safetensors"
    train_cascade.train_base(steps=2, batch=2, lr=1e-3, seed=0, out=base)
    rows = check_cascade.shrinkage(base, scenes_n=3)
    assert len(rows) == 2 * (len(check_cascade.SHRINK_SIGMAS) + len(check_cascade.RESTART_SIGMAS) + 1)
    assert len(rows["toy SD UNet", "contrast per step"]) == toy_world.SAMPLING["steps"]
    # the positive control: the shipped toy SD UNet's low-noise guess keeps the contrast, and its late steps keep real scenes clean
    error, slope, ratio = rows["toy SD UNet", "one step", 0.05]
    assert error < 0.03 and abs(slope - 1) < 0.02 and abs(ratio - 1) < 0.02
    assert rows["toy SD UNet", "restart", 0.5] == 1.0
    # a StageC trained for two steps guesses far worse
    assert rows["toy StageC", "one step", 0.05][0] > 2 * error


@pytest.mark.skipif(not toy_cascade.ULTRAPIXEL_WEIGHTS.is_file(), reason="toy UltraPixel modules not shipped")
def test_ultrapixel_bench_runs_on_the_shipped_toy():
    sys.path.insert(0, str(pathlib.Path(__file__).parent / "bench"))
    import ultrapixel_toy

    results = ultrapixel_toy.main(["--seeds", "1", "--scale", "2"])
    assert {"direct@1x", "direct@2x", "ultrapixel@2x", "ratios"} <= set(results)
    guided = results["ultrapixel@2x"]
    assert 0 <= guided["clean_rate"] <= 1 and math.isfinite(guided["lr_mse"]) and guided["sec_per_image"] > 0


def test_token_count_is_per_stage_c_patch():
    toy = node.Profile(*toy_cascade.ToyCascadeConfig.ultrapixel_profile)
    assert toy.lr_latent(256, 256) == (32, 32) and toy.tokens((32, 32)) == toy.std_tokens == 256
    assert node.Profile(up.COMPRESSION, None, 1).tokens(up.lr_latent_size(4096, 4096)) == 576
