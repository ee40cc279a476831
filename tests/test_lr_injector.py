"""LR Condition Injector and LR-Guided Sampler against the real host, with tiny models.

Probes are ordinary ModelPatcher wrappers: a PREDICT_NOISE probe registered before the injector
sees the sampler's own state, one registered after it sees what the injector hands the model."""

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import comfy.patcher_extension as pe
import comfy.sample
from ultrares.patches import lr_guidance as lg

PREDICT, APPLY = pe.WrappersMP.PREDICT_NOISE, pe.WrappersMP.APPLY_MODEL
STEPS = 4


def sd15_conds():
    pos = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
    return pos, [[torch.zeros(1, 77, 768), {}]]


def flux_conds():
    pos = [[torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1)), {"pooled_output": torch.zeros(1, 32), "guidance": 3.5}]]
    return pos, [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 32)}]]


def sdxl_conds():
    pooled = {"pooled_output": torch.zeros(1, 1280), "width": 128, "height": 128}
    return [[torch.randn(1, 77, 2048, generator=torch.Generator().manual_seed(1)), pooled]], [[torch.zeros(1, 77, 2048), pooled]]


def cosine(t):
    return 0.5 * (1 + math.cos(math.pi * (1000 - t) / 1000))


def probe(calls, kind=PREDICT):
    """A wrapper that records each call's input, sigma and output."""
    def wrapper(executor, x, timestep, *args, **kwargs):
        out = executor(x, timestep, *args, **kwargs)
        calls.append(SimpleNamespace(x=x.clone(), sigma=float(timestep.reshape(-1)[0]), out=out.clone()))
        return out
    return wrapper


def with_probe(model, calls, kind=PREDICT, key="test.probe"):
    m = model.clone()
    m.add_wrapper_with_key(kind, key, probe(calls, kind))
    return m


class Run:
    """Nodes of one test: injector, stock KSampler, SamplerCustom with a (wrapped) sampler."""

    def __init__(self, node_classes, model, conds, lr, hr, seed=5, cfg=3.0):
        self.nc, self.model, self.conds, self.lr, self.hr, self.seed, self.cfg = node_classes, model, conds, lr, hr, seed, cfg

    def inject(self, model=None, **kw):
        args = dict(model=model or self.model, low_res_latent={"samples": self.lr}, seed=self.seed, skip_strength=1.0,
                    alpha1=3.0, global_strength=0.0, alpha2=1.0, blur_sigma=0.8, alpha3=1.0, global_stride=0,
                    upscale_method="bicubic", start_percent=0.0, end_percent=1.0)
        args.update(kw)
        return run_node(self.nc["UltraResLRConditionInjector"], **args)[0]

    def ksampler(self, model, sampler_name="euler", steps=STEPS, denoise=1.0):
        pos, neg = self.conds
        return run_node(self.nc["KSampler"], model=model, seed=self.seed, steps=steps, cfg=self.cfg, sampler_name=sampler_name,
                        scheduler="simple", positive=pos, negative=neg, latent_image={"samples": self.hr}, denoise=denoise)[0]["samples"]

    def custom(self, model, sampler_name="euler", guided=True, steps=STEPS):
        pos, neg = self.conds
        sampler = run_node(self.nc["KSamplerSelect"], sampler_name=sampler_name)[0]
        if guided:
            sampler = run_node(self.nc["UltraResLRGuidedSampler"], sampler=sampler)[0]
        sigmas = run_node(self.nc["BasicScheduler"], model=model, scheduler="simple", steps=steps, denoise=1.0)[0]
        return run_node(self.nc["SamplerCustom"], model=model, add_noise=True, noise_seed=self.seed, cfg=self.cfg, positive=pos,
                        negative=neg, sampler=sampler, sigmas=sigmas, latent_image={"samples": self.hr})[0]["samples"]

    def noised_target(self, sigma):
        """z'(sigma), built here from ComfyUI's own pieces: bicubic upsample, the model's latent format,
        ComfyUI's noise for this seed, the model's noise scaling."""
        base = self.model.model
        up = base.process_latent_in(F.interpolate(self.lr, size=self.hr.shape[-2:], mode="bicubic", align_corners=False))
        noise = comfy.sample.prepare_noise(torch.zeros_like(self.hr), self.seed)
        return base.model_sampling.noise_scaling(torch.tensor([sigma]), noise, up.expand_as(noise))


@contextlib.contextmanager
def input_error(match):
    """The pack's input error (the host loads the pack under its own module name: match the class by name)."""
    with pytest.raises(ValueError, match=match) as excinfo:
        yield
    assert type(excinfo.value).__name__ == "UltraResInputError"


def run_node(cls, **inputs):
    import host
    return host.run_node(cls, **inputs)


# The tiny models run at 8-32 latent px: they declare a native side of 16 (as the toy world declares
# its 32), so the injector's smallest guide (a quarter of native) is 4 latent px here.
def _native_16(model):
    model.model.model_config.native_latent_size = 16
    return model


@pytest.fixture
def sd15(sd15):
    return _native_16(sd15)


@pytest.fixture
def sdxl(sdxl):
    return _native_16(sdxl)


@pytest.fixture
def flux(flux):
    return _native_16(flux)


@pytest.fixture
def sd15_run(node_classes, sd15):
    lr = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    return Run(node_classes, sd15, sd15_conds(), lr, torch.zeros(1, 4, 16, 16))


def blend_weight(pre, post, target):
    """c such that post = (1 - c) pre + c target, by least squares."""
    d = (target - pre).flatten()
    return float(((post - pre).flatten() @ d) / (d @ d))


# -- behaviour --------------------------------------------------------------------------------------
def test_zero_weight_equals_unpatched_run(sd15_run):
    plain = sd15_run.ksampler(sd15_run.model)
    off = sd15_run.inject(skip_strength=0.0, global_strength=0.0)
    assert torch.equal(sd15_run.ksampler(off), plain)
    assert torch.equal(sd15_run.custom(off, guided=True), sd15_run.custom(sd15_run.model, guided=False))


def test_guidance_changes_the_result_and_is_deterministic(sd15_run):
    plain = sd15_run.ksampler(sd15_run.model, steps=2)
    guided = sd15_run.inject(global_strength=1.0)
    a, b = sd15_run.ksampler(guided, steps=2), sd15_run.ksampler(guided, steps=2)
    assert torch.equal(a, b)
    assert (a - plain).abs().mean() > 1e-2 * plain.abs().mean()


@pytest.mark.parametrize("form", ["model_patch", "sampler"])
def test_full_weight_first_state_is_the_noised_upsampled_low_res_latent(sd15_run, form):
    """alpha1 = 0 makes c1 = 1 at every step: the model sees exactly z'(sigma_i)."""
    calls = []
    model = with_probe(sd15_run.inject(alpha1=0.0), calls)
    sd15_run.ksampler(model) if form == "model_patch" else sd15_run.custom(model)
    assert len(calls) == STEPS
    for call in calls:
        torch.testing.assert_close(call.x, sd15_run.noised_target(call.sigma), rtol=1e-5, atol=1e-4)


def test_flux_first_step_has_weight_one_with_default_schedule(node_classes, flux):
    """Flow models start at sigma 1 (t = 1000, cf = 1): the default c1 = cf^3 is exactly 1 there, and
    z' uses the flow noising (1 - sigma) x0 + sigma eps."""
    lr = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    run = Run(node_classes, flux, flux_conds(), lr, torch.zeros(1, 16, 16, 16), cfg=1.0)
    calls = []
    run.ksampler(with_probe(run.inject(), calls), steps=2)
    assert calls[0].sigma == pytest.approx(1.0)
    torch.testing.assert_close(calls[0].x, run.noised_target(calls[0].sigma), rtol=1e-5, atol=1e-5)


def test_sdxl_two_pass_runs_with_global_path(node_classes, sdxl):
    lr = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    run = Run(node_classes, sdxl, sdxl_conds(), lr, torch.zeros(1, 4, 16, 16))
    out = run.ksampler(run.inject(global_strength=1.0), steps=2)
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


def test_skip_weights_follow_the_schedule(sd15_run):
    """Model-patch form: the probe outside the injector sees the state x, the probe inside sees x';
    x' = (1 - c1) x + c1 z' with c1 = cf(t)^alpha1, t = model_sampling.timestep(sigma)."""
    outer, inner = [], []
    alpha1 = 1.5
    model = with_probe(sd15_run.inject(with_probe(sd15_run.model, outer, key="test.outer"), alpha1=alpha1), inner)
    sd15_run.ksampler(model, steps=6)
    ms = sd15_run.model.model.model_sampling
    expected = [cosine(float(ms.timestep(torch.tensor([c.sigma])))) ** alpha1 for c in outer]
    measured = [blend_weight(o.x, i.x, sd15_run.noised_target(o.sigma)) for o, i in zip(outer, inner)]
    assert expected[0] > 0.99 and expected[-1] < 0.1
    for e, m, o, i in zip(expected, measured, outer, inner):
        if e < lg.MIN_WEIGHT:
            assert torch.equal(o.x, i.x)
        else:
            assert m == pytest.approx(e, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("fade", ["demofusion", "step cosine"])
def test_model_patch_is_exact_for_euler(sd15_run, fade):
    """For euler the model-patch form (blend the model input, return the Euler-consistent estimate)
    lands on the same result as blending the sampler state (both forms see the same step fade)."""
    guided = sd15_run.inject(alpha1=1.0, fade=fade)
    patch, exact = sd15_run.ksampler(guided), sd15_run.custom(guided)
    torch.testing.assert_close(patch, exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))


def test_guided_sampler_wraps_ancestral_and_multistep_samplers(sd15_run):
    guided = sd15_run.inject(alpha1=1.0)
    for name in ("euler_ancestral", "dpmpp_2m"):
        a = sd15_run.custom(guided, name, steps=3)
        assert torch.isfinite(a).all()
        assert not torch.allclose(a, sd15_run.custom(sd15_run.model, name, guided=False, steps=3))


def test_global_path_weights_and_blur_follow_the_schedule(sd15_run):
    """Skip residual off: the model output is (1 - c2) D + c2 (x - (x~ - D(x~))), where x~ are the
    sub-lattices (stride 2 = 16 / 8) of x blurred with std blur_sigma (0.99 cf^alpha3 + 0.01)."""
    outer, inner = [], []
    alpha2, alpha3, blur = 0.5, 2.0, 1.2
    model = with_probe(sd15_run.inject(with_probe(sd15_run.model, outer, key="test.outer"), skip_strength=0.0,
                                       global_strength=1.0, alpha2=alpha2, alpha3=alpha3, blur_sigma=blur), inner)
    sd15_run.ksampler(model, steps=3)
    ms = sd15_run.model.model.model_sampling
    assert len(inner) == 2 * len(outer)
    for step, o in enumerate(outer):
        local, sub = inner[2 * step], inner[2 * step + 1]
        cf = cosine(float(ms.timestep(torch.tensor([o.sigma]))))
        blurred = lg.gaussian_blur(o.x, 3, blur * (0.99 * cf ** alpha3 + 0.01))
        assert sub.x.shape == (4, 4, 8, 8)
        torch.testing.assert_close(sub.x, lg.to_sublattices(blurred, 2))
        d_global = o.x - (blurred - lg.from_sublattices(sub.out, 2))
        c2 = cf ** alpha2
        torch.testing.assert_close(o.out, (1 - c2) * local.out + c2 * d_global, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fade", ["step cosine", "step linear"])
def test_step_fades_follow_the_share_of_steps_done(sd15_run, fade):
    """c1 = f(i/n)^alpha1 over the n steps of the run, whatever the timestep; the global path's c2 too."""
    outer, inner = [], []
    steps, alpha1 = 5, 0.5
    model = with_probe(sd15_run.inject(with_probe(sd15_run.model, outer, key="test.outer"), alpha1=alpha1, fade=fade), inner)
    sd15_run.ksampler(model, steps=steps)
    f = (lambda p: (1 + math.cos(math.pi * p)) / 2) if fade == "step cosine" else (lambda p: 1 - p)
    expected = [f(i / steps) ** alpha1 for i in range(steps)]
    measured = [blend_weight(o.x, i.x, sd15_run.noised_target(o.sigma)) for o, i in zip(outer, inner)]
    assert len(measured) == steps and measured == pytest.approx(expected, rel=1e-3, abs=1e-4)
    s = lg.GuidanceSchedule(global_strength=0.5, alpha2=2.0, fade=fade)
    assert s.global_weight(1000, 0.25) == pytest.approx(0.5 * f(0.25) ** 2)  # the timestep plays no part
    assert s.global_weight(0, 0.25) == s.global_weight(1000, 0.25) and s.blur_std(0) == pytest.approx(0.008)


def test_window_limits_the_guidance(sd15_run):
    outer, inner = [], []
    model = with_probe(sd15_run.inject(with_probe(sd15_run.model, outer, key="test.outer"), alpha1=0.0, start_percent=0.5), inner)
    sd15_run.ksampler(model)
    ms = sd15_run.model.model.model_sampling
    start = float(ms.percent_to_sigma(0.5))
    for o, i in zip(outer, inner):
        assert torch.equal(o.x, i.x) == (o.sigma > start)


# -- composition order ------------------------------------------------------------------------------
def test_composition_order(sd15_run):
    """The injector is a PREDICT_NOISE wrapper: PREDICT_NOISE wrappers nest in registration order
    (first registered = outermost), and every APPLY_MODEL wrapper (Patch Split, Re-dilate, ...) runs
    inside all of them, even one applied to the model before the injector."""
    before, after, apply_before = [], [], []
    m = with_probe(sd15_run.model, before, key="test.before")
    m = with_probe(m, apply_before, kind=APPLY, key="test.apply_before")
    m = with_probe(sd15_run.inject(m, alpha1=0.0), after, key="test.after")
    sd15_run.ksampler(m, steps=2)
    z0 = sd15_run.noised_target(before[0].sigma)
    assert not torch.allclose(before[0].x, z0)  # the sampler's own state
    torch.testing.assert_close(after[0].x, z0, rtol=1e-5, atol=1e-4)
    for chunk in apply_before[0].x.split(1):  # cond and uncond chunks of the first step
        torch.testing.assert_close(chunk, z0, rtol=1e-5, atol=1e-4)


def test_lr_guided_cutdiffusion_and_redilation_in_either_node_order(sd15_run):
    """Patch Split and Re-dilate are APPLY_MODEL wrappers and size themselves from each call, so
    the injector (outside them) and its native-size global calls (passed through) compose the same
    whichever node is applied first."""
    nc = sd15_run.nc
    split = lambda m: run_node(nc["UltraResPatchSplit"], model=m, patch_size=8, switch_at=0.5, switch_unit="fraction of steps",
                               window_overlap=0.5, jitter=True, blend="uniform", max_batch=0, seed=0,
                               sdxl_size_conditioning="image size + window crop")[0]
    redilate = lambda m: run_node(nc["UltraResRedilateModel"], model=m, preset="auto (from latent size)", sdxl_layers="intended",
                                  schedule="custom", start_percent=0.0, end_percent=1.0, progressive=False, native_latent_size=8,
                                  dilation=0.0, dispersion_start_percent=0.0, dispersion_end_percent=0.0)[0]
    injected_only = sd15_run.ksampler(sd15_run.inject(global_strength=1.0), steps=2)
    for patch in (split, redilate):
        patch_first = sd15_run.ksampler(sd15_run.inject(patch(sd15_run.model), global_strength=1.0), steps=2)
        injector_first = sd15_run.ksampler(patch(sd15_run.inject(global_strength=1.0)), steps=2)
        assert torch.equal(patch_first, injector_first)
        assert not torch.allclose(patch_first, injected_only)


def test_phases_2x_then_4x(node_classes, sd15):
    """The workflow pattern: base pass, then an injector pass at 2x guided by it, then one at 4x
    guided by the 2x result with the global path strided to native size (stride 4)."""
    base = Run(node_classes, sd15, sd15_conds(), None, torch.zeros(1, 4, 4, 4)).ksampler(sd15, steps=2)
    x2 = Run(node_classes, sd15, sd15_conds(), base, torch.zeros(1, 4, 8, 8))
    twice = x2.ksampler(x2.inject(), steps=2)
    x4 = Run(node_classes, sd15, sd15_conds(), twice, torch.zeros(1, 4, 16, 16))
    calls = []
    x4.ksampler(with_probe(x4.inject(alpha1=0.0, global_strength=1.0, global_stride=4), calls), steps=2)
    torch.testing.assert_close(calls[0].x, x4.noised_target(calls[0].sigma), rtol=1e-5, atol=1e-4)
    assert calls[1].x.shape == (16, 4, 4, 4)  # 4x4 native-size sub-lattices of the 16x16 latent


def test_second_injector_replaces_the_first(sd15_run):
    twice = sd15_run.inject(sd15_run.inject(skip_strength=1.0), skip_strength=0.0)
    assert len(twice.get_wrappers(PREDICT, lg.KEY)) == 1
    assert torch.equal(sd15_run.ksampler(twice, steps=2), sd15_run.ksampler(sd15_run.model, steps=2))


def test_patch_leaves_the_input_model_untouched(sd15_run):
    sd15_run.inject(global_strength=1.0)
    assert not sd15_run.model.get_wrappers(PREDICT, lg.KEY)


# -- bad input --------------------------------------------------------------------------------------
def test_wrong_channel_count_is_a_clear_error(sd15_run):
    with input_error(r"LR Condition Injector: input 'low_res_latent': it has 16 channels.*Fix:"):
        sd15_run.inject(low_res_latent={"samples": torch.zeros(1, 16, 8, 8)})


def test_video_latent_is_a_clear_error(sd15_run):
    with input_error("low_res_latent"):
        sd15_run.inject(low_res_latent={"samples": torch.zeros(1, 4, 2, 8, 8)})


def test_batch_mismatch_is_a_clear_error(node_classes, sd15):
    run = Run(node_classes, sd15, sd15_conds(), torch.zeros(2, 4, 8, 8), torch.zeros(3, 4, 16, 16))
    with input_error(r"batch size 2 differs from the sampled batch size 3"):
        run.ksampler(run.inject(), steps=1)


@pytest.mark.parametrize("form", ["model_patch", "sampler"])
def test_low_res_larger_than_target_is_a_clear_error(node_classes, sd15, form):
    run = Run(node_classes, sd15, sd15_conds(), torch.zeros(1, 4, 8, 24), torch.zeros(1, 4, 16, 16))
    with input_error(r"larger than the 16x16 latent being sampled"):
        run.ksampler(run.inject(), steps=1) if form == "model_patch" else run.custom(run.inject(), steps=1)


@pytest.mark.parametrize("form", ["model_patch", "sampler"])
def test_guide_of_another_aspect_ratio_is_refused_naming_both_sizes(node_classes, sd15, form):
    run = Run(node_classes, sd15, sd15_conds(), torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 16, 32))
    with input_error(r"input 'low_res_latent': it is 8x8 \(latent width x height\), another aspect ratio than the 32x16 "
                     r"latent being sampled.*Fix: sample the guide at the target's aspect ratio \(2:1\), or set aspect_mismatch"):
        run.ksampler(run.inject(), steps=1) if form == "model_patch" else run.custom(run.inject(), steps=1)


def test_aspect_mismatch_center_crop_and_stretch_are_explicit(node_classes, sd15):
    lr = torch.randn(1, 4, 12, 8, generator=torch.Generator().manual_seed(2))  # 8 wide, 12 high; target 16x16
    run = Run(node_classes, sd15, sd15_conds(), lr, torch.zeros(1, 4, 16, 16))
    cropped = run.inject(aspect_mismatch="center crop").get_wrappers(PREDICT, lg.KEY)[0]
    assert torch.equal(cropped.guide((1, 4, 16, 16)), lr[..., 2:10, :])  # the centred 8x8
    assert cropped.stride_for((1, 4, 16, 16)) == 2
    stretched = run.inject(aspect_mismatch="stretch").get_wrappers(PREDICT, lg.KEY)[0]
    assert stretched.guide((1, 4, 16, 16)) is stretched.low_res
    for mode in ("center crop", "stretch"):
        assert torch.isfinite(run.ksampler(run.inject(aspect_mismatch=mode), steps=1)).all()
    # the same aspect ratio up to one guide pixel of rounding is no mismatch
    assert lg.same_aspect((8, 8), (16, 17)) and not lg.same_aspect((8, 8), (16, 20))


def test_guide_below_a_quarter_of_the_native_side_is_refused(node_classes, sd15):
    run = Run(node_classes, sd15, sd15_conds(), torch.zeros(1, 4, 1, 1), torch.zeros(1, 4, 16, 16))
    with input_error(r"input 'low_res_latent': it is 1x1 latent px, below 4 on a side \(a quarter of the model's native 16 "
                     r"latent px\).*Fix: sample the guide near the model's native size, at least 32 px"):
        run.inject()
    run.lr = torch.zeros(1, 4, 4, 4)
    assert run.inject().get_wrappers(PREDICT, lg.KEY)


def test_guided_sampler_wrapped_twice_blends_once(sd15_run):
    guided = sd15_run.inject(alpha1=1.0)
    sampler = run_node(sd15_run.nc["KSamplerSelect"], sampler_name="euler")[0]
    once = run_node(sd15_run.nc["UltraResLRGuidedSampler"], sampler=sampler)[0]
    twice = run_node(sd15_run.nc["UltraResLRGuidedSampler"], sampler=once)[0]
    assert twice.sampler_function.lr_guided_inner is sampler.sampler_function
    pos, neg = sd15_run.conds
    sigmas = run_node(sd15_run.nc["BasicScheduler"], model=guided, scheduler="simple", steps=STEPS, denoise=1.0)[0]
    out = [run_node(sd15_run.nc["SamplerCustom"], model=guided, add_noise=True, noise_seed=sd15_run.seed, cfg=sd15_run.cfg,
                    positive=pos, negative=neg, sampler=s, sigmas=sigmas, latent_image={"samples": sd15_run.hr})[0]["samples"]
           for s in (once, twice)]
    assert torch.equal(out[0], out[1])


def test_guided_sampler_without_injector_is_a_clear_error(sd15_run):
    with input_error(r"LR-Guided Sampler: .*no LR Condition Injector.*Fix:"):
        sd15_run.custom(sd15_run.model, steps=1)


def test_guided_sampler_rejects_a_non_kdiffusion_sampler(node_classes):
    import comfy.samplers

    with input_error("LR-Guided Sampler: input 'sampler'"):
        run_node(node_classes["UltraResLRGuidedSampler"], sampler=comfy.samplers.Sampler())


# -- pure mechanics ---------------------------------------------------------------------------------
def test_sublattices_round_trip_offset_major():
    x = torch.arange(2 * 3 * 6 * 4, dtype=torch.float32).view(2, 3, 6, 4)
    sub = lg.to_sublattices(x, 2)
    assert torch.equal(sub[2 * 1 + 1], x[1, :, 0::2, 1::2])  # offset (dy=0, dx=1), sample 1
    assert torch.equal(lg.from_sublattices(sub, 2), x)


def test_global_denoised_reapplies_noise_to_the_unblurred_latent():
    x = torch.randn(1, 4, 9, 10, generator=torch.Generator().manual_seed(0))  # pads to 10x10 for stride 2
    assert torch.allclose(lg.dilated_global_denoised(x, lambda y: y, 2, 1.0), x)  # no predicted noise
    torch.testing.assert_close(lg.dilated_global_denoised(x, lambda y: 0.25 * y, 3, 0.0), 0.25 * x)


def test_gaussian_blur_matches_a_direct_2d_kernel():
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    k = torch.exp(-torch.arange(-2.0, 3.0) ** 2 / (2 * 0.9**2))
    kernel = torch.outer(k, k) / k.sum() ** 2
    direct = F.conv2d(x, kernel.expand(3, 1, 5, 5), padding=2, groups=3)
    dims = (1, 2, 3)
    direct = (direct - direct.mean(dims, keepdim=True)) / direct.std(dims, keepdim=True) * x.std(dims, keepdim=True) + x.mean(dims, keepdim=True)
    torch.testing.assert_close(lg.gaussian_blur(x, 5, 0.9), direct, rtol=1e-4, atol=1e-5)


def test_euler_consistent_denoised_reproduces_the_blended_euler_step():
    g = torch.Generator().manual_seed(0)
    x, xb, d = (torch.randn(1, 4, 4, 4, generator=g) for _ in range(3))
    sigma, sigma_next = 3.0, 1.7
    euler = lambda state, den: state + (sigma_next - sigma) * (state - den) / sigma
    torch.testing.assert_close(euler(x, lg.euler_consistent_denoised(d, x, xb, sigma, sigma_next)), euler(xb, d))


def test_schedule_weights():
    s = lg.GuidanceSchedule(skip_strength=0.5, alpha1=3.0, global_strength=1.0, alpha2=1.0, blur_sigma=0.8, alpha3=1.0)
    assert s.skip_weight(1000) == pytest.approx(0.5) and s.global_weight(500) == pytest.approx(0.5)
    assert s.skip_weight(0) == 0.0 and s.blur_std(0) == pytest.approx(0.008)
    assert s.skip_weight(500) == pytest.approx(0.5 * 0.125)
