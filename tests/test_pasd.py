"""PASD on the real host: the released key layouts of both variants load at full SD1.5 shapes (meta
device), PACA sits where the reference puts it, is exact where it should be a no-op and acts only from
the layers that have it, CFG batching and batch size do not matter, the original model is untouched,
and wrong files / inputs get clear errors."""

import math
import pathlib
import sys

import pytest
import safetensors.torch
import torch

import comfy.cldm.cldm
import comfy.model_detection
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models
import host
import tiny_models
from ultrares.nodes import pasd as pasd_nodes
from ultrares.nodes.common import UltraResInputError
from ultrares.patches import pasd

SD15_FULL = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
             "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "attention_resolutions": [4, 2, 1], "transformer_depth": 1,
             "num_heads": 8, "context_dim": 768, "use_linear_in_transformer": False, "legacy": False,
             "use_spatial_transformer": True, "adm_in_channels": None, "use_temporal_attention": False,
             "use_temporal_resblock": False, "dtype": torch.float32}

# The reference's decoder (research notes 2.3): (query channels, K/V channels) per diffusers (up block, layer).
SD15_PACA = {(0, 0): (1280, 1280), (0, 1): (1280, 1280), (0, 2): (1280, 1280), (1, 0): (1280, 1280), (1, 1): (1280, 1280),
             (1, 2): (1280, 640), (2, 0): (640, 640), (2, 1): (640, 640), (2, 2): (640, 320), (3, 0): (320, 320),
             (3, 1): (320, 320), (3, 2): (320, 320)}


def meta_sd15():
    """SD1.5 at full size on the meta device (no memory): ComfyUI's own UNetModel through its SD15 config."""
    config = comfy.supported_models.SD15(comfy.model_detection.convert_config(dict(SD15_FULL)))
    config.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        model = config.get_model({})
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def released_full_keys():
    """up_blocks.{i}.pixel_attentions.{j}.* as in PASD's pasd/checkpoint-100000/unet file (written out here)."""
    keys = {}
    for (i, j), (c, cs) in SD15_PACA.items():
        p = f"up_blocks.{i}.pixel_attentions.{j}."
        t = p + "transformer_blocks.0."
        keys.update({p + "norm.weight": (c,), p + "norm.bias": (c,), p + "proj_in.weight": (c, c, 1, 1), p + "proj_in.bias": (c,),
                     p + "proj_out.weight": (c, c, 1, 1), p + "proj_out.bias": (c,),
                     t + "attn1.to_q.weight": (c, c), t + "attn1.to_k.weight": (c, c), t + "attn1.to_v.weight": (c, c),
                     t + "attn1.to_out.0.weight": (c, c), t + "attn1.to_out.0.bias": (c,),
                     t + "attn2.to_q.weight": (c, c), t + "attn2.to_k.weight": (c, cs), t + "attn2.to_v.weight": (c, cs),
                     t + "attn2.to_out.0.weight": (c, c), t + "attn2.to_out.0.bias": (c,),
                     t + "ff.net.0.proj.weight": (8 * c, c), t + "ff.net.0.proj.bias": (8 * c,), t + "ff.net.2.weight": (c, 4 * c),
                     t + "ff.net.2.bias": (c,)})
        for n in (1, 2, 3):
            keys[t + f"norm{n}.weight"] = keys[t + f"norm{n}.bias"] = (c,)
    return keys


def released_light_keys():
    """PASD-light's additions (pasd_light/checkpoint-120000/unet): text transformers of up_blocks 1-3 only."""
    keys = {}
    for (i, j), (c, cs) in SD15_PACA.items():
        if i == 0:
            continue
        p = f"up_blocks.{i}.attentions.{j}."
        t = p + "transformer_blocks.0."
        keys.update({p + "proj_in_plus.weight": (cs, cs, 1, 1), p + "proj_in_plus.bias": (cs,),
                     t + "norm2_plus.weight": (c,), t + "norm2_plus.bias": (c,), t + "attn2_plus.to_q.weight": (c, c),
                     t + "attn2_plus.to_k.weight": (c, cs), t + "attn2_plus.to_v.weight": (c, cs),
                     t + "attn2_plus.to_out.0.weight": (c, c), t + "attn2_plus.to_out.0.bias": (c,)})
    return keys


BASE_KEYS = {"conv_in.weight": (320, 4, 3, 3), "up_blocks.1.attentions.0.proj_in.weight": (1280, 1280, 1, 1),
             "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (1280, 768)}  # the file's SD1.5 base (ignored)


def meta_reader(shapes):
    return lambda k: torch.empty(shapes[k], device="meta")


def test_decoder_layout_is_the_reference_table():
    layers = pasd.decoder_layout(320, [1, 2, 4, 4], 2)
    assert {(l.up_block, l.layer): (l.channels, l.skip_channels) for l in layers} == SD15_PACA
    assert [l.index for l in layers] == list(range(12))


def test_full_pasd_keys_load_at_sd15_shapes_and_sit_before_each_upsampler():
    model = meta_sd15()
    shapes = released_full_keys() | BASE_KEYS
    variant, modules = pasd_nodes.read_paca(model, shapes, meta_reader(shapes))
    assert variant == pasd.FULL and sorted(modules) == list(range(12))
    assert modules[5].transformer.transformer_blocks[0].attn2.to_k.weight.shape == (1280, 640)
    assert modules[8].transformer.proj_in.weight.shape == (640, 640, 1, 1)
    params = sum(p.numel() for m in modules.values() for p in m.parameters())
    assert 240e6 < params < 260e6  # the research notes' ~248M for the 12 PACA transformers

    patched = pasd_nodes.with_paca(model, variant, modules)
    unet = model.model.diffusion_model
    kinds = lambda n: [type(m).__name__ for m in unet.output_blocks[n]]
    before = [kinds(n) for n in range(12)]
    patched.inject_model()
    try:
        assert kinds(0) == ["ResBlock", "PACALayer"]
        assert kinds(2) == ["ResBlock", "PACALayer", "Upsample"]
        assert kinds(3) == ["ResBlock", "SpatialTransformer", "PACALayer"]
        assert kinds(5) == kinds(8) == ["ResBlock", "SpatialTransformer", "PACALayer", "Upsample"]
        assert kinds(11) == ["ResBlock", "SpatialTransformer", "PACALayer"]
        assert all(unet.output_blocks[n][-2 if n in (2, 5, 8) else -1] is modules[n] for n in range(12))
    finally:
        patched.eject_model()
    assert [kinds(n) for n in range(12)] == before
    assert "patches" not in model.model_options["transformer_options"]


def test_light_pasd_keys_load_at_sd15_shapes():
    model = meta_sd15()
    shapes = released_light_keys() | BASE_KEYS
    variant, modules = pasd_nodes.read_paca(model, shapes, meta_reader(shapes))
    assert variant == pasd.LIGHT and sorted(modules) == list(range(3, 12))
    assert modules[5].proj_in_plus.weight.shape == (640, 640, 1, 1)
    assert modules[5].transformer_blocks[0].attn2_plus.to_k.weight.shape == (1280, 640)
    params = sum(p.numel() for m in modules.values() for p in m.parameters())
    assert 27e6 < params < 30e6  # ~28.7M


def sd15_controlnet_keys():
    """A PASD ControlNet's diffusers keys at SD1.5 size (meta), to_rgbs heads included."""
    config = comfy.model_detection.convert_config(dict(SD15_FULL))
    config.pop("out_channels")
    net = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, device="meta", operations=comfy.ops.disable_weight_init)
    sd = pasd_nodes.controlnet_to_diffusers(config, net.state_dict())
    for i, c in enumerate((32, 96, 256)):
        sd[f"controlnet_cond_embedding.to_rgbs.{i}.weight"] = torch.empty(3, c, 3, 3, device="meta")
        sd[f"controlnet_cond_embedding.to_rgbs.{i}.bias"] = torch.empty(3, device="meta")
    return sd, net


def test_pasd_controlnet_layout_maps_onto_comfyui_controlnet():
    sd, net = sd15_controlnet_keys()
    # ComfyUI's stock loader detects a diffusers ControlNet by these keys as SD1.5 ...
    detected = comfy.model_detection.unet_config_from_diffusers_unet(sd)
    assert detected is not None and detected["model_channels"] == 320 and detected["context_dim"] == 768
    # ... and every key but the to_rgbs heads maps onto ComfyUI's ControlNet (the hint block included)
    mapping = pasd_nodes.diffusers_controlnet_keys(detected, sd)
    converted = {mapping[k] for k in sd if k in mapping}
    assert converted == set(net.state_dict())
    assert sorted(k for k in sd if k not in mapping) == sorted(k for k in sd if k.startswith(pasd_nodes.TRAINING_ONLY))


# ---- wrong files and inputs -------------------------------------------------------------------------

@pytest.mark.parametrize("shapes, message", [
    ({"add_embedding.linear_1.weight": (1280, 2816), "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (1280, 2048)}, "SDXL"),
    ({"lora_unet_up_blocks_1_attentions_0_proj_in.lora_down.weight": (4, 1280, 1, 1)}, "LoRA"),
    ({"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3)}, "ControlNet"),
    (BASE_KEYS, "no PACA keys"),
    ({k: v for k, v in released_full_keys().items() if ".pixel_attentions.2." not in k}, "missing"),
])
def test_wrong_files_are_refused_clearly(shapes, message):
    with pytest.raises(UltraResInputError, match=f"PASD UNet Loader: input 'unet_name'.*{message}"):
        pasd_nodes.read_paca(meta_sd15(), shapes, meta_reader(shapes))


def test_pasd_for_sd15_does_not_fit_another_size(sd15):
    shapes = released_full_keys()
    with pytest.raises(UltraResInputError, match="do not fit this model's decoder"):
        pasd_nodes.read_paca(sd15, shapes, meta_reader(shapes))


def test_an_sdxl_model_input_is_refused(sdxl):
    with pytest.raises(UltraResInputError, match="PASD UNet Loader: input 'model'.*not SD1.5"):
        host.run_node(pasd_nodes.PASDUNetLoader, model=sdxl, unet_name="x.safetensors")
    with pytest.raises(UltraResInputError, match="PASD ControlNet Loader: input 'model'.*not SD1.5"):
        host.run_node(pasd_nodes.PASDControlNetLoader, model=sdxl, control_net_name="x.safetensors")


# ---- tiny PASD for the forward ----------------------------------------------------------------------

tiny_paca_file, tiny_controlnet = tiny_models.pasd_unet_file, tiny_models.pasd_controlnet_file


def save(folder, name, sd):
    path = host.BASE_DIRECTORY / "models" / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return name


def load_pasd(model, variant, **kw):
    name = save("diffusion_models", f"pasd_{variant}_{sorted(kw.items())}.safetensors", tiny_paca_file(model, variant, **kw))
    return host.run_node(pasd_nodes.PASDUNetLoader, model=model, unet_name=name)[0]


def load_controlnet(model):
    return host.run_node(pasd_nodes.PASDControlNetLoader, model=model, control_net_name=save("controlnet", "tiny_pasd_cn.safetensors", tiny_controlnet(model)))[0]


def cond(seed):
    return [[torch.randn(1, 7, 768, generator=torch.Generator().manual_seed(seed)), {}]]


HINT = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))


def with_control(node_classes, controlnet, positive, negative, together=True):
    apply = node_classes["ControlNetApplyAdvanced"]
    if together:
        return host.run_node(apply, positive=positive, negative=negative, control_net=controlnet, image=HINT, strength=0.8, start_percent=0.0, end_percent=1.0)[:2]
    pos, _ = host.run_node(apply, positive=positive, negative=negative, control_net=controlnet, image=HINT, strength=0.8, start_percent=0.0, end_percent=1.0)[:2]
    _, neg = host.run_node(apply, positive=positive, negative=negative, control_net=controlnet, image=HINT, strength=0.8, start_percent=0.0, end_percent=1.0)[:2]
    return pos, neg  # two ControlNet copies: ComfyUI cannot batch cond and uncond together


def sample(node_classes, model, controlnet=None, batch=1, together=True, steps=1):
    positive, negative = cond(1), cond(2)
    if controlnet is not None:
        positive, negative = with_control(node_classes, controlnet, positive, negative, together)
    latent = {"samples": torch.zeros(batch, 4, 8, 8)}
    out = host.run_node(node_classes["KSampler"], model=model, seed=3, steps=steps, cfg=3.0, sampler_name="euler",
                        scheduler="normal", positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    return out[0]["samples"]


@pytest.mark.parametrize("variant", [pasd.FULL, pasd.LIGHT])
def test_zero_paca_leaves_the_output_unchanged_and_random_paca_changes_it(node_classes, sd15, variant):
    cn = load_controlnet(sd15)
    reference = sample(node_classes, sd15, cn)
    assert torch.equal(sample(node_classes, load_pasd(sd15, variant, zero=True), cn), reference)
    patched = load_pasd(sd15, variant)
    assert (sample(node_classes, patched, cn) - reference).abs().max() > 1e-3
    assert torch.equal(sample(node_classes, patched), sample(node_classes, sd15)), "without a ControlNet PACA must do nothing"
    # the original model: unchanged after patching and after sampling the patched clone
    assert torch.equal(sample(node_classes, sd15, cn), reference)
    assert not any(isinstance(m, pasd_nodes.PACALayer) for m in sd15.model.diffusion_model.modules())
    assert "patches" not in sd15.model_options["transformer_options"]


def output_block_results(node_classes, model, controlnet):
    """Each decoder block's result in the first model call (probes: an output-block patch sees the previous
    block's result, a hook on the UNet's `out` head the last one)."""
    seen = {}
    probe = model.clone()

    def record(h, hsp, transformer_options):
        n = transformer_options["block"][1]
        seen.setdefault(n - 1 if n else "middle", h.clone())
        return h, hsp

    probe.set_model_output_block_patch(record)
    unet = model.model.diffusion_model
    hook = unet.out.register_forward_pre_hook(lambda m, args: seen.setdefault(len(unet.output_blocks) - 1, args[0].clone()))
    try:
        sample(node_classes, probe, controlnet, steps=1)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("variant, layer", [(pasd.FULL, 0), (pasd.FULL, 3), (pasd.LIGHT, 1)])
def test_only_the_decoder_layers_with_paca_change(node_classes, sd15, variant, layer):
    cn = load_controlnet(sd15)
    plain = output_block_results(node_classes, sd15, cn)
    paca = output_block_results(node_classes, load_pasd(sd15, variant, only={layer}), cn)
    assert torch.equal(plain["middle"], paca["middle"])
    for n in range(len(sd15.model.diffusion_model.output_blocks)):
        if n < layer:
            assert torch.equal(plain[n], paca[n]), f"output block {n} changed before the PACA layer {layer}"
        else:
            assert (plain[n] - paca[n]).abs().max() > 1e-4, f"output block {n} did not change"


@pytest.mark.parametrize("variant", [pasd.FULL, pasd.LIGHT])
def test_cfg_batching_and_batch_size_do_not_matter(node_classes, sd15, variant):
    cn = load_controlnet(sd15)
    patched = load_pasd(sd15, variant)
    together = sample(node_classes, patched, cn, batch=2)
    apart = sample(node_classes, patched, cn, batch=2, together=False)
    single = sample(node_classes, patched, cn, batch=1)
    assert torch.allclose(together, apart, atol=1e-5)
    assert torch.allclose(together[:1], single, atol=1e-5)


def test_reapplying_replaces_and_variants_switch(sd15):
    full = load_pasd(sd15, pasd.FULL)
    twice = load_pasd(full, pasd.FULL, seed=4)
    patches = twice.model_options["transformer_options"]["patches"]
    assert len(patches["forward_timestep_embed_patch"]) == 1 and len(twice.injections[pasd_nodes.KEY]) == 1
    assert len(twice.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, pasd_nodes.KEY)) == 1
    light = load_pasd(twice, pasd.LIGHT)
    patches = light.model_options["transformer_options"]["patches"]
    assert patches["forward_timestep_embed_patch"] == [] and pasd_nodes.KEY not in light.injections
    assert len(patches["middle_patch"]) == len(patches["attn2_output_patch"]) == 1


def test_controlnet_loader_drops_to_rgbs_and_refuses_rrdb(sd15):
    cn = load_controlnet(sd15)
    assert type(cn).__name__ == "ControlNet" and isinstance(cn.control_model, comfy.cldm.cldm.ControlNet)
    sd = tiny_controlnet(sd15)
    sd["controlnet_cond_embedding.preprocesser.0.rdb1.conv1.weight"] = torch.zeros(16, 16, 3, 3)
    name = save("controlnet", "pasd_rrdb_cn.safetensors", sd)
    with pytest.raises(UltraResInputError, match="PASD ControlNet Loader: input 'control_net_name': pasd_rrdb_cn.safetensors is an RRDB variant"):
        host.run_node(pasd_nodes.PASDControlNetLoader, model=sd15, control_net_name=name)


def test_a_truncated_file_is_refused_clearly(sd15):
    name = save("diffusion_models", "pasd_truncated.safetensors", tiny_paca_file(sd15, pasd.FULL))
    path = host.BASE_DIRECTORY / "models" / "diffusion_models" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UltraResInputError, match="PASD UNet Loader: input 'unet_name'.*truncated"):
        host.run_node(pasd_nodes.PASDUNetLoader, model=sd15, unet_name=name)


# ---- the recipe around sampling ---------------------------------------------------------------------

def test_init_latent_is_the_reference_double_noising(sd15):
    latent = {"samples": torch.ones(1, 4, 8, 8)}
    out = host.run_node(pasd_nodes.PASDInitLatent, model=sd15, latent=latent, added_noise_level=900)[0]["samples"]
    # SD1.5's scaled-linear betas: abar_900 by the reference's formula (diffusers DDPMScheduler)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    assert out.flatten()[0].item() == pytest.approx(float(abar[900].sqrt()), rel=1e-4)
    assert 0.11 < out.flatten()[0].item() < 0.13  # the research notes' ~0.119


def test_color_fix_restores_the_input_low_frequencies():
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 96), indexing="ij")
    truth = torch.stack([0.2 + 0.6 * x, 0.3 + 0.4 * y, 0.5 + 0.2 * x * y])[None]
    detail = 0.1 * torch.sign(torch.sin(40 * x) * torch.sin(37 * y))[None, None]
    result = (truth + detail + torch.tensor([0.15, -0.1, 0.05]).view(1, 3, 1, 1)).clamp(0, 1)  # a colour cast
    reference = (truth + 0.02 * torch.randn(truth.shape, generator=g)).clamp(0, 1)
    to_image = lambda t: t.movedim(1, -1)
    fixed = host.run_node(pasd_nodes.PASDColorFix, image=to_image(result), reference=to_image(reference[..., ::2, ::2]), levels=5)[0].movedim(-1, 1)
    low = lambda t: pasd.wavelet_bands(t, 5)[1]
    before = (low(result) - low(reference)).abs().mean()
    after = (low(fixed) - low(reference)).abs().mean()
    assert after < 0.15 * before, (before, after)
    high = lambda t: pasd.wavelet_bands(t, 5)[0]
    assert (high(fixed) - high(result)).abs().mean() < 0.2 * high(result).abs().mean()  # the detail stays the result's


def test_tile_layout_is_the_reference_one():
    assert pasd.tile_origins(512, 320, 8) == [0, 192]  # a 4K output: two tiles per side
    assert pasd.tile_origins(320, 320, 8) == [0]
    assert pasd.tile_origins(700, 320, 8) == [0, 312, 380]
    w = pasd.gaussian_weights(4, 6)
    assert w.shape == (4, 6) and torch.allclose(w, w.flip(0)) and torch.allclose(w, w.flip(1)) and w[1, 2] > w[0, 0]


def tiled(model, tile, overlap=2):
    return host.run_node(pasd_nodes.PASDTiledSampling, model=model, tile_size=tile, tile_overlap=overlap)[0]


def test_tiler_equals_the_untiled_path_when_the_latent_fits_one_tile(node_classes, sd15):
    cn = load_controlnet(sd15)
    patched = load_pasd(sd15, pasd.FULL)
    assert torch.equal(sample(node_classes, tiled(patched, 8), cn), sample(node_classes, patched, cn))


def test_tiler_crops_the_hint_with_the_latent_and_blends(sd15):
    cn = load_controlnet(sd15).copy().set_cond_hint(torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2)))
    wrapper = pasd_nodes.tiled_cond_batch(6, 2)
    x_in = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    seen = []

    def executor(model, conds, x, timestep, model_options):  # stands in for the rest of ComfyUI's cond batch
        seen.append((x.clone(), cn.cond_hint_original.clone(), cn.cond_hint))
        return [x * 2, x - 1]

    out = wrapper(executor, None, [[{"control": cn}], [{"control": cn}]], x_in, torch.tensor([500.0]), {})
    assert torch.allclose(out[0], x_in * 2, atol=1e-5) and torch.allclose(out[1], x_in - 1, atol=1e-5)
    origins = [(y, x) for y in (0, 2) for x in (0, 4, 6)]
    assert len(seen) == len(origins)
    full = cn.cond_hint_original
    for (y, x), (latent, hint, cached) in zip(origins, seen):
        assert torch.equal(latent, x_in[..., y:y + 6, x:x + 6])
        assert torch.equal(hint, full[..., y * 8:(y + 6) * 8, x * 8:(x + 6) * 8]) and cached is None
    assert cn.cond_hint_original is full and cn.cond_hint is None  # restored


def test_tiled_sampling_runs_through_the_host(node_classes, sd15):
    cn = load_controlnet(sd15)
    patched = load_pasd(sd15, pasd.FULL)
    out = sample(node_classes, tiled(patched, 6), cn)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    assert (out - sample(node_classes, patched, cn)).abs().max() > 1e-4


def test_toy_training_smoke_saves_the_released_layouts_that_the_loaders_read(tmp_path):
    from toy_world import train_pasd
    from ultrares.nodes import toy_world

    summary = train_pasd.train(steps=1, batch=1, lr=1e-3, seed=0, out_dir=tmp_path)
    assert summary["steps"] == 1 and (tmp_path / train_pasd.LOG_FILE).is_file()
    unet = safetensors.torch.load_file(str(tmp_path / train_pasd.UNET_FILE))
    assert "conv_in.weight" in unet and "up_blocks.0.pixel_attentions.0.transformer_blocks.0.attn2.to_k.weight" in unet
    cn_keys = safetensors.torch.load_file(str(tmp_path / train_pasd.CONTROLNET_FILE))
    assert "controlnet_cond_embedding.to_rgbs.2.weight" in cn_keys and "controlnet_mid_block.weight" in cn_keys
    model = toy_world.build_model(toy_world.load_weights(toy_world.WEIGHTS)[0])
    for folder, name in (("diffusion_models", train_pasd.UNET_FILE), ("controlnet", train_pasd.CONTROLNET_FILE)):
        target = host.BASE_DIRECTORY / "models" / folder / f"smoke_{name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((tmp_path / name).read_bytes())
    patched = host.run_node(pasd_nodes.PASDUNetLoader, model=model, unet_name=f"smoke_{train_pasd.UNET_FILE}")[0]
    assert len(patched.injections[pasd_nodes.KEY]) == 1
    cn = host.run_node(pasd_nodes.PASDControlNetLoader, model=model, control_net_name=f"smoke_{train_pasd.CONTROLNET_FILE}")[0]
    trained = {k: v for k, v in cn_keys.items() if k.startswith("controlnet_down_blocks.0.")}
    assert torch.equal(cn.control_model.zero_convs[0][0].weight, trained["controlnet_down_blocks.0.weight"])

    # --init-dir: a run goes on from these files, every saved tensor taken as it was (a fresh build differs)
    gen = torch.Generator().manual_seed(1)
    fresh, resumed = train_pasd.build(model, gen), train_pasd.build(model, gen, tmp_path)
    config = resumed[3]
    saved = pasd_nodes.controlnet_to_diffusers(config, resumed[0].state_dict())
    assert all(torch.equal(saved[k], cn_keys[k]) for k in saved)
    assert torch.equal(resumed[1][2].weight, cn_keys["controlnet_cond_embedding.to_rgbs.2.weight"])
    layer = pasd_nodes.decoder_of(model)[0]
    key = f"up_blocks.{layer.up_block}.pixel_attentions.{layer.layer}.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(resumed[2][layer.index].transformer.transformer_blocks[0].attn2.to_k.weight, unet[key])
    assert not torch.equal(fresh[2][layer.index].transformer.transformer_blocks[0].attn2.to_k.weight, unet[key])


def test_sr_bench_runs_on_the_shipped_toy_pasd():
    sys.path.insert(0, str(pathlib.Path(__file__).parent / "bench"))
    import pasd_sr

    results = pasd_sr.main(["--scenes", "1", "--steps", "1", "--methods", "bicubic,controlnet-only", "--color-levels", "5,7",
                            "--threads", str(torch.get_num_threads())])
    assert set(results) == {"ground_truth", "bicubic", "controlnet-only", "controlnet-only, levels 7"}
    for name in ("bicubic", "controlnet-only", "controlnet-only, levels 7"):
        assert math.isfinite(results[name]["psnr"]) and 0 <= results[name]["clean_rate"] <= 1
    # the same sample, fixed at another level: the same time, another picture
    assert results["controlnet-only, levels 7"]["sec_per_image"] == results["controlnet-only"]["sec_per_image"]
    assert results["controlnet-only, levels 7"]["psnr"] != results["controlnet-only"]["psnr"]
