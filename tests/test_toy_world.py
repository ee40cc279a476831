"""The toy world: its object counter on pictures with known contents, and its loader as a real
ComfyUI model (in-process and through a live server's /prompt)."""

import math
import pathlib

import numpy as np
import pytest
import torch

import host
from toy_world import measure, scenes


def scene_with(n_objects: int, size: int, seed: int) -> torch.Tensor:
    """A gradient picture of `size` px with n objects of the toy world's own sizes, never touching."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=gen)
    canvas = scenes.gradient(rand(1, 3) * 1.6 - 0.8, rand(1, 3) * 1.6 - 0.8, rand(1) * 2 * math.pi, size)
    placed = []
    while len(placed) < n_objects:
        r = float(scenes.RADIUS[0] + rand(1) * (scenes.RADIUS[1] - scenes.RADIUS[0]))
        c = (r + 1 + rand(2) * (size - 2 * r - 2))
        if all(float((c - pc).norm()) > r + pr + 3 for pc, pr in placed):
            placed.append((c, r))
    for i, (c, r) in enumerate(placed):
        colour = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, 1.0]][i % 2]).reshape(1, 3)
        flat_bg = canvas.mean((2, 3))  # a colour far from the local background
        colour = torch.where(flat_bg > 0, -1.0, 1.0) if i % 3 == 2 else colour
        canvas = scenes.draw(canvas, torch.tensor([i % 3]), c.reshape(1, 2), torch.tensor([r]), colour)
    return canvas[0]


@pytest.mark.parametrize("size,n_objects", [(32, 1), (64, 1), (64, 2), (64, 3), (128, 1), (128, 2), (128, 5)])
def test_counter_counts_known_objects(size, n_objects):
    for seed in range(3):
        reading = measure.read(scene_with(n_objects, size, seed).numpy())
        assert reading.objects == n_objects, (size, n_objects, seed, reading)
        assert reading.clean, reading


def test_counter_reads_empty_background_and_training_scenes():
    empty = scene_with(0, 64, 0).numpy()
    assert measure.read(empty).objects == 0 and not measure.read(empty).clean
    pictures, _ = scenes.sample(64, torch.Generator().manual_seed(1))
    readings = [measure.read(p) for p in pictures.numpy()]
    assert sum(r.objects == 1 for r in readings) >= 62  # two colours may rarely merge with a gradient end
    assert all(r.clean for r in readings if r.objects == 1)
    ratios = [r.size_ratio for r in readings]
    assert 0.3 < np.mean(ratios) < 0.6  # objects of radius 6-11 px in 32 px


def test_noise_is_not_a_clean_picture():
    gen = torch.Generator().manual_seed(2)
    pure = torch.rand(3, 64, 64, generator=gen) * 2 - 1
    noisy = scene_with(1, 64, 0) + 0.3 * torch.randn(3, 64, 64, generator=gen)
    for picture in (pure, noisy):
        assert not measure.read(picture.numpy()).clean, measure.read(picture.numpy())


def test_edge_band_follows_the_picture_scale():
    """A bicubic 4x upscale of clean training scenes is the ideal 4x picture, soft edges 4 px wide: read
    at its scale it is clean, one object each. The fixed 1-px band called most of them unclean. Noise
    on top still fails: the wider band does not let a grainy picture pass."""
    pictures, _ = scenes.sample(12, torch.Generator().manual_seed(5))
    up = torch.nn.functional.interpolate(pictures, scale_factor=4, mode="bicubic")
    readings = [measure.read(p, 4) for p in up.numpy()]
    assert all(r.clean and r.objects == 1 for r in readings), readings
    assert sum(not measure.read(p, 1).clean for p in up.numpy()) >= 4
    grainy = up + 0.06 * torch.randn(up.shape, generator=torch.Generator().manual_seed(6))
    assert not any(measure.read(p, 4).clean for p in grainy.numpy())


def test_summary_figures():
    readings = [measure.read(scene_with(n, 64, n).numpy()) for n in (1, 1, 2, 3)]
    s = measure.summary(readings)
    assert s["repetition_rate"] == 0.5 and s["mean_objects"] == 1.75 and s["clean_rate"] == 1.0
    assert s["repetition_ci"] == measure.wilson_interval(2, 4) and s["clean_ci"] == measure.wilson_interval(4, 4)


def test_wilson_interval():
    z2 = 1.96 ** 2
    assert measure.wilson_interval(0, 33) == (0.0, pytest.approx(z2 / (33 + z2)))  # closed form at 0 successes
    assert measure.wilson_interval(33, 33) == (pytest.approx(33 / (33 + z2)), 1.0)
    import scipy.stats

    for k in (1, 10, 20, 32):  # against scipy's own Wilson interval at the same z
        ref = scipy.stats.binomtest(k, 33).proportion_ci(method="wilson")
        assert measure.wilson_interval(k, 33, z=scipy.stats.norm.ppf(0.975)) == (pytest.approx(ref.low), pytest.approx(ref.high))
    lo, hi = measure.wilson_interval(10, 33)
    assert hi - lo < 0.31  # "33 seeds give about +-0.15"


# ------------------------------------------------------------------ the loader, in the real host

def load(node_classes, shape="disk"):
    return host.run_node(node_classes["UltraResToyWorldLoader"], shape=shape)


def test_loader_gives_an_sd15_family_model_conditionings_and_a_vae(node_classes):
    import comfy.supported_models
    from ultrares.nodes import common, toy_world

    model, positive, negative, vae = load(node_classes)
    assert isinstance(model.model.model_config, comfy.supported_models.SD15)
    assert common.native_latent_size(model) == toy_world.NATIVE_LATENT_SIZE == 32
    assert model.model.model_type.name == "EPS"
    _, square, square_negative, _ = load(node_classes, "square")
    assert positive[0][0].shape == (1, toy_world.CONTEXT_TOKENS, toy_world.CONTEXT_DIM)
    assert not torch.equal(positive[0][0], square[0][0]) and not torch.equal(positive[0][0], negative[0][0])
    assert torch.equal(negative[0][0], square_negative[0][0])  # one unconditional embedding for every shape
    # VAE: each latent pixel becomes an 8x8 block of its RGB; encoding the picture gives the latent back
    rgb = scene_with(1, 32, 0)[None]
    latent = toy_world.to_latent(rgb)
    image = vae.decode(latent)
    assert image.shape == (1, 256, 256, 3)
    assert torch.allclose(image[0, 4::8, 4::8].permute(2, 0, 1), ((rgb[0] + 1) / 2).clamp(0, 1), atol=1e-6)
    assert torch.allclose(vae.encode(image), latent.clamp(-1, 1), atol=1e-5)


def test_loader_builds_a_fresh_model_each_time(node_classes):
    a, b = load(node_classes)[0], load(node_classes)[0]
    assert a.model is not b.model
    pa, pb = dict(a.model.diffusion_model.named_parameters()), dict(b.model.diffusion_model.named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_native_samples_hold_one_clean_object(node_classes):
    """The shipped weights draw what they were trained on: at 32x32 one object on a clean gradient."""
    import comfy.sample

    from ultrares.nodes import toy_world

    model, positive, negative, _ = load(node_classes, "triangle")
    seeds = range(6)
    noise = torch.cat([torch.randn((1, 4, 32, 32), generator=torch.manual_seed(s)) for s in seeds])
    sampling = toy_world.SAMPLING
    out = comfy.sample.sample(model, noise, sampling["steps"], sampling["cfg"], sampling["sampler_name"], sampling["scheduler"],
                              positive, negative, torch.zeros_like(noise), seed=0)
    readings = measure.read_latents(out)
    assert sum(r.objects == 1 and r.clean for r in readings) >= 5, readings


def test_missing_weights_say_how_to_get_them(node_classes, monkeypatch, tmp_path):
    import sys

    loader = node_classes["UltraResToyWorldLoader"]
    module = sys.modules[loader.__module__]  # the copy the host imported the pack as
    monkeypatch.setattr(module, "WEIGHTS", tmp_path / "toy_world.safetensors")
    with pytest.raises(ValueError, match="Toy World Loader: input 'shape'.*missing.*train.py"):
        load(node_classes)


def test_prompt_round_trip_through_the_toy_world(comfy_server):
    """A graph with a node of the pack queued through the live server's /prompt returns an image."""
    from PIL import Image

    from ultrares.nodes import toy_world

    prompt = {
        "1": {"class_type": "UltraResToyWorldLoader", "inputs": {"shape": "square"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["1", 1], "negative": ["1", 2],
                                                   "latent_image": ["2", 0], "seed": 3, "denoise": 1.0,
                                                   **dict(toy_world.SAMPLING, steps=12)}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 3]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "toy_round_trip"}},
    }
    entry = comfy_server.run_prompt(prompt)
    images = entry["outputs"]["5"]["images"]
    assert len(images) == 1
    png = comfy_server.base / "output" / images[0].get("subfolder", "") / images[0]["filename"]
    with Image.open(png) as im:
        assert im.size == (256, 256)
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    assert measure.read_images(pixels[None])[0].objects >= 1


def test_training_is_seeded_and_reproducible(tmp_path):
    """The training command gives the same weights from the same seed (a few steps of it, twice)."""
    import safetensors.torch
    from toy_world import train

    runs = []
    for name in ("a", "b"):
        train.train(steps=3, batch=4, lr=1e-3, seed=7, out=tmp_path / f"{name}.safetensors")
        runs.append(safetensors.torch.load_file(str(tmp_path / f"{name}.safetensors")))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    train.train(steps=3, batch=4, lr=1e-3, seed=8, out=tmp_path / "c.safetensors")
    other = safetensors.torch.load_file(str(tmp_path / "c.safetensors"))
    assert not torch.equal(other["out.2.weight"], runs[0]["out.2.weight"])


def test_repetition_bench_reads_each_scale_with_its_edge_band(node_classes, tmp_path):
    """The bench's positive control (native pictures upscaled, no sampling) at 4x: read with the band of
    its scale it is as clean as the natives, and --fixed-edge-band gives the older reader's figures."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("repetition", pathlib.Path(__file__).parent / "bench" / "repetition.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--seeds", "6", "--scales", "4", "--methods", "bicubic", "--threads", str(torch.get_num_threads())]
    scaled, fixed = bench.main(args), bench.main(args + ["--fixed-edge-band"])
    assert scaled["bicubic@4x"]["edge_band"] == 4 and fixed["bicubic@4x"]["edge_band"] == 1
    assert scaled["direct@1x"]["clean_rate"] == fixed["direct@1x"]["clean_rate"]  # native: the same reader
    assert scaled["bicubic@4x"]["clean_rate"] >= scaled["direct@1x"]["clean_rate"] > fixed["bicubic@4x"]["clean_rate"]
    assert scaled["bicubic@4x"]["residual_rms"] < fixed["bicubic@4x"]["residual_rms"]
