"""ScaleCrafter: re-dilation, dispersion and noise-damped CFG against the real host and tiny models,
plus the layer maps on the real SD1.5/SD2.1/SDXL UNet structures (built on the meta device)."""

import math

import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.ops
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.supported_models
import comfy.utils
import pytest
import torch
import torch.nn.functional as F

import host
import tiny_models
from ultrares.nodes import scalecrafter as ns
from ultrares.nodes.common import UltraResInputError
from ultrares.patches import scalecrafter as sc
from ultrares.patches.schedule import SigmaWindow, StepWindow, step_index

APPLY_MODEL = comfy.patcher_extension.WrappersMP.APPLY_MODEL
NATIVE = 16  # tiny models are treated as native at 16x16 latents


def redilate(model, **inputs):
    args = dict(preset=ns.AUTO, sdxl_layers="intended", schedule="custom", start_percent=0.0, end_percent=1.0,
                progressive=False, native_latent_size=NATIVE, dilation=0.0, dispersion_start_percent=0.0, dispersion_end_percent=0.0)
    return host.run_node(ns.RedilateModel, model=model, **(args | inputs))[0]


def damp(model, **inputs):
    args = dict(damped_uncond="milder dilation", start_percent=0.0, end_percent=1.0, schedule="custom")
    return host.run_node(ns.NoiseDampedCFG, model=model, **(args | inputs))[0]


def cond(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, 4, model.model.model_config.unet_config["context_dim"], generator=gen)
    extra = {"pooled_output": torch.randn(1, 1280, generator=gen)} if isinstance(model.model, comfy.model_base.SDXL) else {}
    return [[ctx, extra]]


def denoised(model, size=32, sigma=5.0, cfg=1.0, positive=None, negative=None, seed=0):
    """One model evaluation through the stock sampler path: the denoised prediction at `sigma`."""
    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    out = []
    comfy.sample.sample(model, noise, 1, cfg, "euler", "normal", positive or cond(model), negative or cond(model, 2), latent,
                        sigmas=torch.tensor([sigma, 0.0]), callback=lambda i, x0, x, n: out.append(x0.clone()), disable_pbar=True, seed=seed)
    return out[0]


class Recorder:
    """A test APPLY_MODEL wrapper registered after the pack's (so inside it): logs each UNet call."""

    def __init__(self):
        self.calls = []

    def __call__(self, executor, x, t, *args, **kwargs):
        options = args[3]
        self.calls.append(dict(sigma=float(t[0]), rows=tuple(options["cond_or_uncond"]), plan=sc._PLAN.get(),
                               damped=sc.DAMPED_PASS in options))
        return executor(x, t, *args, **kwargs)


def recorded(model):
    rec = Recorder()
    model.add_wrapper_with_key(APPLY_MODEL, "test.recorder", rec)
    return rec


class ConvProbe:
    """Captures the input and output of one conv of the shared UNet (forward hooks, removed after)."""

    def __init__(self, model, path):
        self.conv = comfy.utils.get_attr(model.model.diffusion_model, path)
        self.seen = []

    def __enter__(self):
        self.handle = self.conv.register_forward_hook(lambda m, inp, out: self.seen.append((inp[0].detach(), out.detach())))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def conv_weights(conv):
    return conv.weight.float(), conv.bias.float()


# --- the dispersion transform R ------------------------------------------------------------------


def test_dispersion_matrix_is_the_least_squares_solution_and_matches_the_reference_values():
    r = sc.dispersion_matrix()
    assert r.shape == (25, 9) and r is sc.dispersion_matrix()  # cached
    # Defining property, computed independently with torch's own align-corners upsampling:
    # b = R a minimises the structure + eta^2 pixel calibration over every basis input.
    a = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    up = lambda x: F.interpolate(x[None, None], size=(5, 5), mode="bilinear", align_corners=True)[0, 0]
    corr = lambda x, k: F.conv2d(x[None, None], k[None, None], padding=k.shape[-1] // 2)[0, 0]

    def loss(b):
        total = 0
        for x in torch.eye(9, dtype=torch.float64).view(9, 3, 3):
            total = total + (corr(up(x), b) - up(corr(x, a))).square().sum() + 0.05**2 * (corr(x, b) - corr(x, a)).square().sum()
        return total

    b = (r @ a.flatten()).view(5, 5).requires_grad_()
    loss(b).backward()
    assert b.grad.abs().max() < 1e-10
    for k in range(5):
        bump = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) * 1e-3
        assert loss(b.detach() + bump) > loss(b.detach())
    # Sanity values of the reference's R20to1_new (research note).
    assert torch.allclose(r[:, 4], torch.eye(25, dtype=torch.float64)[12], atol=1e-12)
    assert torch.allclose(r.sum(0), torch.tensor([1.127, 1.061, 1.127, 1.061, 1.0, 1.061, 1.127, 1.061, 1.127], dtype=torch.float64), atol=1e-3)
    ones = (r @ torch.ones(9, dtype=torch.float64)).view(5, 5)
    assert ones[0, 0].item() == pytest.approx(0.591, abs=1e-3) and ones[2, 2].item() == pytest.approx(0.519, abs=1e-3)
    assert ones[1, 1].item() == pytest.approx(0.186, abs=1e-3)
    assert torch.allclose(r[:5, 0], torch.tensor([0.649, 0.276, -0.107, 0.062, -0.026], dtype=torch.float64), atol=1e-3)


# --- the operator -----------------------------------------------------------------------------


@pytest.mark.parametrize("stride,size", [(1, 12), (2, 12), (2, 9)])
def test_operator_matches_its_definition(stride, size):
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(8, 6, 3, stride=stride, padding=1)
    x = torch.randn(2, 8, size, size, generator=gen)
    native = sc.conv_output_size(conv, x.shape[-2:])
    assert tuple(conv(x).shape[-2:]) == native
    # d = 1: the conv itself
    assert torch.equal(sc.redilated_conv(x, conv.weight, conv.bias, conv.stride, 1, 1.0, native), conv(x))
    # integer d: torch's dilated conv with "same" padding
    for d in (2, 3):
        expected = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=d, dilation=d)
        got = sc.redilated_conv(x, conv.weight, conv.bias, conv.stride, 1, float(d), native)
        if tuple(expected.shape[-2:]) == native:
            assert torch.allclose(got, expected, atol=1e-6)
    # fractional d: enlarge by ceil(d)/d, dilate by ceil(d), resize back to the conv's own output size
    d = 2.5
    big = F.interpolate(x, size=(round(size * 1.2),) * 2, mode="bilinear", align_corners=False)
    expected = F.interpolate(F.conv2d(big, conv.weight, conv.bias, stride=stride, padding=3, dilation=3), size=native, mode="bilinear", align_corners=False)
    got = sc.redilated_conv(x, conv.weight, conv.bias, conv.stride, 1, d, native)
    assert got.shape[-2:] == conv(x).shape[-2:] and torch.allclose(got, expected, atol=1e-6)


# --- tables and schedule ------------------------------------------------------------------------


def test_progressive_schedule_reproduces_the_reference_steps():
    # research note: d=4, tau=35 -> 4 for steps 0-8, 3 for 9-17, 2 for 18-34; d=3, tau=37 -> 3 for 0-12
    assert [sc.progressive_dilation(4, i / 35) for i in range(35)] == [4] * 9 + [3] * 9 + [2] * 17
    assert [sc.progressive_dilation(3, i / 37) for i in range(37)] == [3] * 13 + [2] * 24
    assert sc.progressive_dilation(1.5, 0.5) == 1.5  # below 2 the factor is kept


def test_cosine_decays_hold_then_ease_to_their_floor():
    # d_i = f + (d - f)(1 + cos(pi i/n))/2: the full factor at the first step, the mean of d and f halfway
    for decay, floor in (("cosine to 2", 2.0), ("cosine to 1", 1.0)):
        got = [sc.progressive_dilation(4, i / 20, decay) for i in range(21)]
        assert got[0] == 4 and got[10] == pytest.approx((4 + floor) / 2) and got[20] == pytest.approx(floor)
        assert got[5] == pytest.approx(floor + (4 - floor) * (1 + math.sqrt(0.5)) / 2)
        assert all(a > b for a, b in zip(got, got[1:]))  # fractional: no plateaus
    assert sc.progressive_dilation(1.5, 0.5, "cosine to 2") == 1.5  # the floor never lifts a factor below 2
    assert sc.progressive_dilation(3, 0.0, "reference") == sc.progressive_dilation(3, 0.0) == 3


def test_cosine_decay_plan_on_the_sampler_schedule_ends_undilated(sd15):
    m = redilate(sd15, dilation=4.0, progressive=True, decay="cosine to 1")
    red = m.get_wrappers(APPLY_MODEL, ns.WRAPPER_KEY)[0]
    sigmas = torch.linspace(14.0, 0.03, 8).tolist() + [0.0]
    plans = [red.plan((32, 32), s, {"sample_sigmas": torch.tensor(sigmas)}) for s in sigmas[:-1]]
    mids = [p.get("middle_block.0.in_layers.2") for p in plans]
    assert [m.dilation for m in mids] == pytest.approx([sc.progressive_dilation(4, i / 8, "cosine to 1") for i in range(8)])
    in1 = next(site.path for site in red.sites if site.slot == "in1")  # a shallower level: its own factor, same fade
    d = sc.auto_table(red.levels, 4.0)["in1"]
    assert 1 < d < 4 and [p[in1].dilation for p in plans] == pytest.approx([1 + (d - 1) * (1 + math.cos(math.pi * i / 8)) / 2 for i in range(8)])
    assert redilate(sd15, dilation=4.0, progressive=True).get_wrappers(APPLY_MODEL, ns.WRAPPER_KEY)[0].decay == "reference"


def test_progressive_plan_counts_steps_on_the_sampler_schedule(sd15):
    m = redilate(sd15, dilation=4.0, progressive=True)
    red = m.get_wrappers(APPLY_MODEL, ns.WRAPPER_KEY)[0]
    sigmas = torch.linspace(14.0, 0.03, 36).tolist() + [0.0]  # 36 steps, every one inside the window
    mids = [red.plan((32, 32), s, {"sample_sigmas": torch.tensor(sigmas)})["middle_block.0.in_layers.2"].dilation for s in sigmas[:-1]]
    assert mids == [sc.progressive_dilation(4, i / 36) for i in range(36)] and mids[0] == 4 and mids[-1] == 2


def test_auto_tables_follow_the_reference_rule():
    assert sc.auto_table(4, 4.0) == sc.table("in1 down1 out1 up1:2; in2 down2 out2 up2:3; in3 down3 out3 up3 mid:4")
    assert sc.auto_table(4, 2.0) == sc.table("in1 down1 out1 up1 in2 down2 out2 up2 in3 down3 out3 up3 mid:2")
    assert sc.auto_table(3, 1.0) == {}
    main, damped, _ = sc.PRESETS["SD1.5 2048x2048 / 2048x1024"].tables()
    assert sc.milder_table(main, 4) == damped  # the rule reproduces the reference's damped table
    main, damped, _ = sc.PRESETS["SD2.1 2048x2048"].tables()
    assert sc.milder_table(main, 4) == damped


def test_sdxl_presets_default_to_the_reference_tables_as_they_run():
    # research note §1.3: the reference's SDXL configs name down_blocks.3 (absent), so input blocks 7-8 (in2) run
    # undilated at 2048/2560, at 3 at 4096x2048 (its down_blocks.2 line), at 4 at 4096x4096; damped: mid, L2-out at 2.
    assert {i.id: i for i in ns.RedilateModel.define_schema().inputs}["sdxl_layers"].default == "official"
    expected = {
        "SDXL 2048x2048": ("mid out2 up2:2", None, 0.60, False),
        "SDXL 2560x2560": ("mid out2 up2:2.5", None, 0.60, False),
        "SDXL 4096x2048": ("in2 out1 up1:3; mid out2 up2:4; out0:2", "mid out2 up2:2", 0.70, True),
        "SDXL 4096x4096": ("in2 mid out2 up2:4; out1 up1:3; out0:2", "mid out2 up2:2", 0.70, True),
    }
    for name, (main, damped, end, ndcfg) in expected.items():
        preset = sc.PRESETS[name]
        got_main, got_damped, _ = preset.tables()
        assert got_main == sc.table(main), name
        assert (preset.end_percent, preset.ndcfg, preset.progressive) == (end, ndcfg, ndcfg), name
        if damped:
            assert got_damped == sc.table(damped), name
        # 'intended': in2 dilated like the middle block, in the damped table too
        intended, intended_damped, _ = preset.tables(intended=True)
        assert intended["in2"] == intended["mid"]
        if damped:
            assert intended_damped == sc.table(damped) | {"in2": 2.0}
        assert {k: v for k, v in intended.items() if k != "in2"} == {k: v for k, v in got_main.items() if k != "in2"}


def test_reference_noise_damped_guidance_per_preset():
    # ndcfg_tau of each reference config (research note §1.3): 0 = never used
    used = {name for name, preset in sc.PRESETS.items() if preset.ndcfg}
    assert used == {"SD1.5 2048x2048 / 2048x1024", "SD2.1 2048x2048", "SDXL 4096x2048", "SDXL 4096x4096"}
    assert [sc.PRESETS[n].end_percent * 50 for n in sorted(used)] == pytest.approx([35, 37, 35, 35])
    assert sc.PRESETS["SD2.1 2048x1024"].end_percent * 50 == pytest.approx(37)


# --- layer maps on the real structures ------------------------------------------------------------

REAL = {
    "SD1.5": dict(channel_mult=[1, 2, 4, 4], attention_resolutions=[1, 2, 4], transformer_depth=1, transformer_depth_middle=1,
                  context_dim=768, num_heads=8, use_linear_in_transformer=False, adm_in_channels=None),
    "SD2.1": dict(channel_mult=[1, 2, 4, 4], attention_resolutions=[1, 2, 4], transformer_depth=1, transformer_depth_middle=1,
                  context_dim=1024, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=None),
    "SDXL": dict(channel_mult=[1, 2, 4], attention_resolutions=[2, 4], transformer_depth=[0, 2, 10], transformer_depth_middle=10,
                 context_dim=2048, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential"),
}
# what ComfyUI's model detection builds for these checkpoints (comfy/model_detection.py)
REAL_DEPTHS = {"SD1.5": ([1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
               "SD2.1": ([1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
               "SDXL": ([0, 0, 2, 2, 10, 10], [0, 0, 0, 2, 2, 2, 10, 10, 10])}


def real_unet(family):
    base = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2,
                use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False, dtype=torch.float16)
    config = comfy.model_detection.convert_config(base | REAL[family])
    assert (config["transformer_depth"], config["transformer_depth_output"]) == REAL_DEPTHS[family]
    with torch.device("meta"):
        return config, openaimodel.UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)


def check_layer_map(config, unet):
    sites = sc.unet_conv_sites(config)
    levels = len(config["channel_mult"])
    paths = [s.path for s in sites]
    assert len(paths) == len(set(paths))
    # exactly the 3x3 convs of the UNet minus the stem and the output conv
    convs = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}
    assert set(paths) == convs - {"input_blocks.0.0", "out.2"}
    # the slot of each site agrees with ComfyUI's own diffusers <-> LDM key map
    to_diffusers = {v: k for k, v in comfy.utils.unet_to_diffusers(config).items()}
    for site in sites:
        name = to_diffusers[site.path + ".weight"]
        kind, level = site.slot.rstrip("0123456789"), site.slot[len(site.slot.rstrip("0123456789")):]
        expected = {"in": f"down_blocks.{level}.resnets.", "down": f"down_blocks.{level}.downsamplers.0.conv",
                    "mid": "mid_block.resnets.", "out": f"up_blocks.{levels - 1 - int(level or 0)}.resnets.",
                    "up": f"up_blocks.{levels - 1 - int(level or 0)}.upsamplers.0.conv"}[kind]
        assert name.startswith(expected), (site, name)
        assert name.endswith(("conv1.weight", "conv2.weight")) == (kind in ("in", "mid", "out"))
    return {s.slot for s in sites}, {s.path: s.slot for s in sites}


@pytest.mark.parametrize("family", ["SD1.5", "SD2.1", "SDXL"])
def test_layer_maps_name_real_layers(family):
    config, unet = real_unet(family)
    slots, by_path = check_layer_map(config, unet)
    for name, preset in sc.PRESETS.items():
        if (preset.levels == 4) != (family != "SDXL"):
            continue
        for intended in (False, True):
            main, damped, disperse = preset.tables(intended)
            assert set(main) | set(damped) | disperse <= slots, (name, set(main) - slots)
    # the research note's mapping table
    expected = {"SD1.5": {"input_blocks.9.0.op": "down2", "output_blocks.2.1.conv": "up3", "output_blocks.5.2.conv": "up2",
                          "output_blocks.8.2.conv": "up1", "input_blocks.10.0.in_layers.2": "in3", "middle_block.2.out_layers.3": "mid"},
                "SDXL": {"input_blocks.6.0.op": "down1", "output_blocks.2.2.conv": "up2", "output_blocks.5.2.conv": "up1",
                         "input_blocks.7.0.in_layers.2": "in2", "output_blocks.8.0.out_layers.3": "out0"}}.get(family, {})
    for path, slot in expected.items():
        assert by_path[path] == slot


def test_layer_maps_name_tiny_fixture_layers(sd15, sdxl):
    for model in (sd15, sdxl, tiny_models.tiny_sd15(channel_mult=[1, 1, 1, 1], num_res_blocks=2, attention_resolutions=[2, 4])):
        check_layer_map(model.model.model_config.unet_config, model.model.diffusion_model)


# --- the patched model ----------------------------------------------------------------------------


def test_at_native_size_auto_mode_is_the_unpatched_model(sd15):
    patched = redilate(sd15)
    assert torch.equal(denoised(patched, size=16), denoised(sd15, size=16))
    assert not torch.allclose(denoised(patched, size=32), denoised(sd15, size=32))  # the same patched model, read at sampling time


def test_dilated_layers_equal_functional_conv(sd15):
    patched = redilate(sd15, dilation=2.5)  # level 2 and mid at 2.5 (fractional), level 1 at 2, level 0 untouched
    table = sc.auto_table(3, 2.5)
    assert table["in1"] == 2.0 and table["in2"] == 2.5 and "in0" not in table
    cases = {"input_blocks.3.0.in_layers.2": 2, "input_blocks.4.0.op": 2, "output_blocks.3.1.conv": 2,
             "input_blocks.5.0.out_layers.3": 2.5, "output_blocks.1.2.conv": 2.5, "input_blocks.1.0.in_layers.2": 1}
    probes = {p: ConvProbe(sd15, p) for p in cases}
    for probe in probes.values():
        probe.__enter__()
    try:
        denoised(patched)
    finally:
        for probe in probes.values():
            probe.__exit__()
    for path, d in cases.items():
        (x, y), = probes[path].seen
        conv = probes[path].conv
        w, b = conv_weights(conv)
        if d == int(d):
            expected = F.conv2d(x, w, b, stride=conv.stride, padding=int(d), dilation=int(d))
        else:
            big = F.interpolate(x, size=(round(x.shape[-2] * 1.2), round(x.shape[-1] * 1.2)), mode="bilinear", align_corners=False)
            expected = F.interpolate(F.conv2d(big, w, b, stride=conv.stride, padding=3, dilation=3), size=y.shape[-2:], mode="bilinear", align_corners=False)
        assert torch.allclose(y, expected, atol=1e-5), path


def test_dispersed_layers_use_5x5_kernels_at_half_dilation(sd15):
    patched = redilate(sd15, dilation=4.0, dispersion_end_percent=1.0)
    plain_path, dispersed_path = "input_blocks.3.0.in_layers.2", "input_blocks.5.0.in_layers.2"  # d 3 (not at the peak), d 4
    with ConvProbe(sd15, plain_path) as plain, ConvProbe(sd15, dispersed_path) as dispersed:
        denoised(patched)
    (x, y), = dispersed.seen
    w, b = conv_weights(dispersed.conv)
    w5 = torch.einsum("mn,oin->oim", sc.dispersion_matrix().float(), w.flatten(2)).reshape(*w.shape[:2], 5, 5)
    assert torch.allclose(y, F.conv2d(x, w5, b, padding=4, dilation=2), atol=1e-5)
    (x, y), = plain.seen
    w, b = conv_weights(plain.conv)
    assert torch.allclose(y, F.conv2d(x, w, b, padding=3, dilation=3), atol=1e-5)


def test_patches_act_only_inside_their_step_ranges(sd15):
    patched = redilate(sd15, dilation=2.0, start_percent=0.2, end_percent=0.6, dispersion_start_percent=0.4, dispersion_end_percent=0.8)
    rec = recorded(patched)
    host.run_node(host.load_nodes()["KSampler"], model=patched, seed=0, steps=10, cfg=3.0, sampler_name="euler", scheduler="karras",
                  positive=cond(sd15), negative=cond(sd15, 2), latent_image={"samples": torch.zeros(1, 4, 32, 32)}, denoise=1.0)
    assert len(rec.calls) == 10
    # steps 2-5 of 10 re-dilated, steps 4-7 dispersed (where both are active: 4, 5), whatever the scheduler
    assert [c["plan"] is not None for c in rec.calls] == [i in range(2, 6) for i in range(10)]
    assert [bool(c["plan"]) and any(s.disperse for s in c["plan"].values()) for c in rec.calls] == [i in (4, 5) for i in range(10)]
    # read as timestep percent instead: a sigma window, the same for a one-step sampling at any sigma
    sigma_based = redilate(sd15, dilation=2.0, start_percent=0.2, end_percent=0.6, window_unit="timestep percent")
    sampling = sd15.get_model_object("model_sampling")
    outside, inside_sigma = float(sampling.percent_to_sigma(0.1)), float(sampling.percent_to_sigma(0.4))
    assert torch.equal(denoised(sigma_based, sigma=outside), denoised(sd15, sigma=outside))
    assert not torch.allclose(denoised(sigma_based, sigma=inside_sigma), denoised(sd15, sigma=inside_sigma))


@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential", "beta", "sgm_uniform", "simple", "ddim_uniform"])
def test_windows_count_the_reference_steps_on_every_scheduler(sd15, scheduler):
    """The reference is active for steps i < tau of 50 (SD2.1 2048: tau 37) and decays d = 4 as
    4 for steps 0-9, 3 for 10-18, 2 for 19-36 (research note §1.3), on whatever schedule is sampled."""
    sampling = sd15.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, 50)
    assert len(sigmas) == 51
    window = StepWindow.from_percents(sampling, 0.0, 0.74)
    assert sum(window.contains(float(s), sigmas) for s in sigmas[:-1]) == 37
    red = redilate(sd15, preset=ns.AUTO, dilation=4.0, end_percent=0.74, progressive=True).get_wrappers(APPLY_MODEL, ns.WRAPPER_KEY)[0]
    plans = [red.plan((32, 32), float(s), {"sample_sigmas": sigmas}) for s in sigmas[:-1]]
    mids = [p["middle_block.0.in_layers.2"].dilation if p else 1 for p in plans]
    assert mids == [4] * 10 + [3] * 9 + [2] * 18 + [1] * 13
    # an intermediate evaluation of a higher-order sampler belongs to its step
    assert step_index(sigmas, (float(sigmas[36]) + float(sigmas[37])) / 2) == 36
    if scheduler == "karras":  # ComfyUI's sigma convention covers other step counts (the issue: 30 instead of 37)
        assert sum(SigmaWindow.from_percents(sampling, 0.0, 0.74).contains(float(s)) for s in sigmas[:-1]) == 30


def test_step_windows_fall_back_to_sigma_outside_a_sampler(sd15, caplog):
    sampling = sd15.get_model_object("model_sampling")
    window = StepWindow.from_percents(sampling, 0.0, 0.5, "Re-dilate Model")
    high, low = float(sampling.percent_to_sigma(0.2)), float(sampling.percent_to_sigma(0.8))
    with caplog.at_level("WARNING"):
        assert window.contains(high) and not window.contains(low)
    assert "Re-dilate Model: the sampler's schedule is unknown" in caplog.text and "timestep percent" in caplog.text


def test_every_preset_runs_on_its_family(sdxl):
    sd_like = tiny_models.tiny_sd15(channel_mult=[1, 1, 1, 1], attention_resolutions=[4, 8])  # 4 levels like SD1.x
    families = {sc.SD1: sd_like, sc.SD2: tiny_models.tiny_sd21(), sc.SDXL: sdxl}
    for family, model in families.items():
        plain = denoised(model, cfg=2.0)
        for name, preset in sc.PRESETS.items():
            if preset.family == family:
                redilated = redilate(model, preset=name, schedule="reference")
                out = denoised(damp(redilated) if preset.ndcfg else redilated, cfg=2.0)
                assert torch.isfinite(out).all() and not torch.allclose(out, plain), name
            else:  # the family is checked, not only the level count (SD1.5 and SD2.1 both have 4 levels)
                with pytest.raises(UltraResInputError, match=rf"input 'preset': '{name}' is the reference's table for "
                                                             rf"{preset.family} models, but this model is {family}"):
                    redilate(model, preset=name)


def test_applying_twice_replaces_instead_of_stacking(sd15):
    twice = redilate(redilate(sd15, dilation=4.0), dilation=2.0)
    assert len(twice.get_wrappers(APPLY_MODEL, ns.WRAPPER_KEY)) == 1
    assert all(p.previous.__func__ is type(p.conv).forward for p in twice.object_patches.values())
    assert torch.equal(denoised(twice), denoised(redilate(sd15, dilation=2.0)))


def test_original_model_is_untouched_after_patching_and_sampling(sd15):
    sites = sc.unet_conv_sites(sd15.model.model_config.unet_config)
    weights = {k: v.clone() for k, v in sd15.model.state_dict().items()}
    options = repr(sd15.model_options)
    before = denoised(sd15, cfg=3.0)
    patched = damp(redilate(sd15, dilation=2.0, dispersion_end_percent=1.0))
    assert not sd15.object_patches and not sd15.wrappers and repr(sd15.model_options) == options
    assert len(patched.object_patches) == len(sites)
    denoised(patched, cfg=3.0)
    assert not sd15.object_patches and not sd15.wrappers and repr(sd15.model_options) == options
    comfy.model_management.unload_all_models()  # ComfyUI unpatches a loaded clone lazily
    for site in sites:
        conv = comfy.utils.get_attr(sd15.model.diffusion_model, site.path)
        assert conv.forward.__func__ is type(conv).forward and conv.dilation == (1, 1) and conv.padding == (1, 1)
    assert all(torch.equal(v, weights[k]) for k, v in sd15.model.state_dict().items())
    assert torch.equal(denoised(sd15, cfg=3.0), before)


def test_weight_casting_lowvram_and_lora_weight_functions_keep_working():
    config = comfy.model_detection.convert_config(dict(tiny_models.SD15_UNET))
    model_config = comfy.supported_models.SD15(config)
    model_config.set_inference_dtype(torch.bfloat16, torch.float32)  # bf16 weights, fp32 compute (manual cast)
    model = model_config.get_model({})
    tiny_models.init_parameters(model.diffusion_model)
    base = tiny_models.patcher(model)
    path = "input_blocks.5.0.in_layers.2"
    conv = comfy.utils.get_attr(model.diffusion_model, path)
    assert conv.weight.dtype == torch.bfloat16
    lora = base.clone()
    delta = torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.1
    lora.add_patches({f"diffusion_model.{path}.weight": (delta,)}, 1.0)
    patched = redilate(lora, dilation=2.0)
    x = torch.randn(1, 4, 32, 32)
    sigma = torch.tensor([5.0])
    patched.patch_model(lowvram_model_memory=1)  # everything offloaded: cast per call, LoRA as a weight function
    try:
        assert conv.comfy_cast_weights and conv.weight_function
        with ConvProbe(patched, path) as probe:
            model.apply_model(x, sigma, c_crossattn=cond(patched)[0][0], transformer_options={"wrappers": patched.wrappers})
    finally:
        patched.unpatch_model()
    (inp, out), = probe.seen
    weight = conv.weight.float() + delta  # ComfyUI applies the LoRA to the cast (fp32) weight
    expected = F.conv2d(inp, weight, conv.bias.float(), padding=2, dilation=2)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-4)


# --- noise-damped CFG -----------------------------------------------------------------------------


def test_noise_damped_cfg_equals_the_formula_from_separate_passes(sd15):
    redilated = redilate(sd15, dilation=4.0)
    guided = damp(redilated)
    w, pos, neg = 4.0, cond(sd15), cond(sd15, 2)
    result = denoised(guided, cfg=w, positive=pos, negative=neg)
    cond_a = denoised(redilated, positive=pos, negative=pos)
    uncond_a = denoised(redilated, positive=neg, negative=neg)
    damped_model = redilated.clone()
    window = SigmaWindow.from_percents(sd15.get_model_object("model_sampling"), 0.0, 1.0)
    damped_model.model_options.setdefault("transformer_options", {})[sc.DAMPED_PASS] = sc.DampedPass(window, False)
    uncond_b = denoised(damped_model, positive=neg, negative=neg)
    assert not torch.allclose(uncond_b, uncond_a)
    assert torch.allclose(result, uncond_b + w * (cond_a - uncond_a), atol=1e-5)
    # the paper's variant: the base is the unpatched model's uncond
    undilated = denoised(damp(redilated, damped_uncond="undilated"), cfg=w, positive=pos, negative=neg)
    assert torch.allclose(undilated, denoised(sd15, positive=neg, negative=neg) + w * (cond_a - uncond_a), atol=1e-5)


def run_sampler_custom_advanced(model, steps, cfg):
    nodes = host.load_nodes()
    noise, = host.run_node(nodes["RandomNoise"], noise_seed=0)
    guider, = host.run_node(nodes["CFGGuider"], model=model, positive=cond(model), negative=cond(model, 2), cfg=cfg)
    sampler, = host.run_node(nodes["KSamplerSelect"], sampler_name="euler")
    sigmas, = host.run_node(nodes["BasicScheduler"], model=model, scheduler="normal", steps=steps, denoise=1.0)
    return host.run_node(nodes["SamplerCustomAdvanced"], noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                         latent_image={"samples": torch.zeros(1, 4, 32, 32)})[0]


def run_ksampler(model, steps, cfg):
    return host.run_node(host.load_nodes()["KSampler"], model=model, seed=0, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal",
                         positive=cond(model), negative=cond(model, 2), latent_image={"samples": torch.zeros(1, 4, 32, 32)}, denoise=1.0)[0]


@pytest.mark.parametrize("run", [run_ksampler, run_sampler_custom_advanced])
def test_noise_damped_cfg_costs_one_extra_uncond_pass_per_active_step(sdxl, run):
    guided = damp(redilate(sdxl, preset="SDXL 4096x4096"), start_percent=0.0, end_percent=0.5)
    rec = recorded(guided)
    out = run(guided, 6, 5.0)
    assert torch.isfinite(out["samples"]).all()
    by_sigma = {}
    for call in rec.calls:
        by_sigma.setdefault(call["sigma"], []).append(call)
    assert len(by_sigma) == 6
    for step, calls in enumerate(by_sigma.values()):
        main = [c for c in calls if not c["damped"]]
        extra = [c for c in calls if c["damped"]]
        assert sorted(r for c in main for r in c["rows"]) == [0, 1]
        assert [c["rows"] for c in extra] == ([(1,)] if step < 3 else [])  # steps 0-2 of 6


def test_noise_damped_cfg_follows_the_preset_reference(sdxl):
    """Default schedule: the re-dilation's own range (ndcfg_tau = dilate_tau); a preset whose reference
    never damps (ndcfg_tau 0) is refused with the way out."""
    red = redilate(sdxl, preset="SDXL 4096x4096", schedule="reference")
    guided = host.run_node(ns.NoiseDampedCFG, model=red, damped_uncond="milder dilation", start_percent=0.0, end_percent=0.2)[0]
    window = guided.model_options["sampler_pre_cfg_function"][-1].window
    assert window is red.get_wrappers(APPLY_MODEL, ns.WRAPPER_KEY)[0].window and window.end_percent == 0.7
    sigmas = torch.linspace(14.0, 0.0, 51)
    assert sum(window.contains(float(s), sigmas) for s in sigmas[:-1]) == 35
    with pytest.raises(UltraResInputError, match=r"Noise-Damped CFG: input 'schedule': the reference never uses noise-damped "
                                                  r"guidance with preset 'SDXL 2048x2048'.*Fix: remove this node, or set schedule to 'custom'"):
        host.run_node(ns.NoiseDampedCFG, model=redilate(sdxl, preset="SDXL 2048x2048"), damped_uncond="milder dilation",
                      start_percent=0.0, end_percent=0.7)


# --- bad input ----------------------------------------------------------------------------------


def cascade_on_meta():
    config = comfy.supported_models.Stable_Cascade_C({"stable_cascade_stage": "c"})
    return tiny_models.patcher(config.get_model({}, device="meta"))


def test_bad_input_gives_clear_errors(sd15, sdxl, flux):
    for model in (flux, cascade_on_meta()):
        with pytest.raises(UltraResInputError, match=r"Re-dilate Model: input 'model'.*Fix: use an SD1.x"):
            redilate(model)
    with pytest.raises(UltraResInputError, match=r"input 'dilation': 0.5 is below 1"):
        redilate(sd15, dilation=0.5)
    with pytest.raises(UltraResInputError, match=r"input 'preset'.*4 levels, this one has 3"):
        redilate(sd15, preset="SD1.5 1024x1024")  # the tiny SD1.5 UNet has 3 levels
    with pytest.raises(UltraResInputError, match=r"input 'start_percent'"):
        redilate(sd15, start_percent=0.8, end_percent=0.2)
    with pytest.raises(UltraResInputError, match=r"input 'dispersion_start_percent': 0.6 is after dispersion_end_percent 0.3"):
        redilate(sd15, dispersion_start_percent=0.6, dispersion_end_percent=0.3)
    with pytest.raises(UltraResInputError, match=r"Noise-Damped CFG: input 'model': the model is not re-dilated"):
        damp(sd15)
