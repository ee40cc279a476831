"""CutDiffusion: Patch Split/Reassemble and Pixel Interaction on the real host with tiny models.

Model calls go through the model's real apply_model and ComfyUI's wrapper chain; where a test needs a
known model output, a probe is registered as an inner APPLY_MODEL wrapper after Patch Split (the
wrappers registered first are outermost), so it sees exactly the patches/windows Patch Split makes."""

import itertools

import pytest
import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.utils
import host
from ultrares.nodes.common import UltraResInputError
from ultrares.nodes.cutdiffusion import UltraResPatchSplit, UltraResPixelInteraction
from ultrares.patches import cutdiffusion as cd

APPLY_MODEL = comfy.patcher_extension.WrappersMP.APPLY_MODEL
DEFAULTS = dict(patch_size=16, switch_at=0.5, switch_unit="fraction of steps", window_overlap=0.5, jitter=True,
                blend="uniform", max_batch=0, seed=0, sdxl_size_conditioning="image size + window crop")
STAGE1, STAGE2 = 50.0, 0.5  # sigmas on either side of the switch used below (switch_unit 'sigma', switch_at 5)


def patch_split(model, **overrides):
    return host.run_node(UltraResPatchSplit, model=model, **dict(DEFAULTS, **overrides))[0]


def cut_diffusion(model, seed=1, **overrides):
    return host.run_node(UltraResPixelInteraction, model=patch_split(model, **overrides), seed=seed)[0]


def add_probe(model, fn):
    """fn(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs) as the innermost wrapper."""
    model.add_wrapper_with_key(APPLY_MODEL, "test.probe", fn)
    return model


def apply(model, x, sigma, context, cond_or_uncond=(0,), **conds):
    """One real apply_model call with the patcher's wrappers and transformer_options, as a sampler makes it."""
    options = comfy.patcher_extension.merge_nested_dicts({"wrappers": model.wrappers},
                                                         model.model_options.get("transformer_options", {}))
    options["cond_or_uncond"] = list(cond_or_uncond)
    t = torch.full((x.shape[0],), float(sigma))
    with torch.no_grad():
        return model.model.apply_model(x, t, c_crossattn=context, transformer_options=options, **conds)


def ksample(node_classes, model, sampler="euler", size=(24, 24), steps=3, seed=3):
    gen = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, 768, generator=gen), {}]]
    neg = [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = {"samples": torch.zeros(1, 4, *size)}
    (out,) = host.run_node(node_classes["KSampler"], model=model, seed=seed, steps=steps, cfg=5.0, sampler_name=sampler,
                           scheduler="normal", positive=cond, negative=neg, latent_image=latent, denoise=1.0)
    return out["samples"]


# ------------------------------------------------------------------ pure mechanics

@pytest.mark.parametrize("hs,ws", [(1, 2), (2, 2), (3, 2), (4, 4)])
def test_split_then_reassemble_is_the_identity(hs, ws):
    x = torch.randn(2, 3, 4 * hs, 5 * ws)
    patches = cd.split_lattice(x, hs, ws)
    assert patches.shape == (hs * ws, 2, 3, 4, 5)
    assert torch.equal(patches[ws + 1 if hs > 1 else 1], x[..., (1 if hs > 1 else 0)::hs, 1::ws])  # row-major (h, w)
    assert torch.equal(cd.merge_lattice(patches, hs, ws), x)


def test_lattice_pads_less_than_one_stride_and_never_exceeds_the_patch():
    for size, patch in itertools.product(range(9, 200, 7), (16, 32, 64)):
        stride, padded = cd.lattice(size, patch)
        assert padded % stride == 0 and 0 <= padded - size < stride and padded // stride <= patch


def test_interaction_permutation_keeps_every_value_and_separation_restores_order():
    patches = torch.randn(6, 2, 4, 8, 8)
    perm = cd.interaction_permutation(6, patches.shape[2:], cd.step_generator(7, 3.25))
    mixed = cd.interact(patches, perm)
    assert torch.equal(mixed.sort(dim=0).values, patches.sort(dim=0).values)  # a permutation at every element
    assert torch.equal(cd.separate(mixed, perm), patches)
    assert 0.05 < (perm == torch.arange(6).view(6, 1, 1, 1)).float().mean() < 0.30  # fresh per element, ~1/6 fixed
    assert torch.equal(perm, cd.interaction_permutation(6, patches.shape[2:], cd.step_generator(7, 3.25)))
    assert not torch.equal(perm, cd.interaction_permutation(6, patches.shape[2:], cd.step_generator(7, 3.0)))


@pytest.mark.parametrize("overlap,jitter", [(0.5, True), (0.75, True), (0.0, False), (0.5, False)])
def test_windows_cover_every_pixel(overlap, jitter):
    for (h, w), seed in itertools.product([(16, 16), (40, 24), (47, 90), (128, 33)], range(5)):
        layout = cd.windows(h, w, 16, overlap, jitter, cd.step_generator(seed, 1.0))
        (wh, ww), (ph, pw) = layout.size, layout.pad
        cover = torch.zeros(h + 2 * ph, w + 2 * pw)
        for y, x in layout.corners:
            assert 0 <= y and y + wh <= h + 2 * ph and 0 <= x and x + ww <= w + 2 * pw
            cover[y:y + wh, x:x + ww] += 1
        assert (cover[ph:ph + h, pw:pw + w] > 0).all(), (h, w, seed)


# ------------------------------------------------------------------ the wrapper in the real host

def test_one_patch_gives_exactly_the_unpatched_model(sd15, node_classes):
    patched = cut_diffusion(sd15, patch_size=16)
    assert torch.equal(ksample(node_classes, patched, size=(16, 16), steps=2), ksample(node_classes, sd15, size=(16, 16), steps=2))
    x, context = torch.randn(1, 4, 16, 12), torch.randn(1, 77, 768)
    for sigma in (STAGE1, STAGE2):
        assert torch.equal(apply(patched, x, sigma, context), apply(sd15, x, sigma, context))


@pytest.mark.parametrize("size", [(32, 32), (40, 24), (17, 33)])
def test_stage1_split_and_reassemble_round_trip_through_the_model_call(sd15, size):
    """An identity model under stage 1 (with pixel interaction) returns the latent unchanged: every
    element goes out to a patch and comes back to its place, also for sizes that need padding."""
    seen = []

    def identity(executor, x, t, *args, **kwargs):
        seen.append(x.shape)
        return x

    model = add_probe(cut_diffusion(sd15, switch_unit="sigma", switch_at=5.0), identity)
    x = torch.randn(1, 4, *size)
    assert torch.equal(apply(model, x, STAGE1, torch.randn(1, 77, 768)), x)
    (hs, ph), (ws, pw) = cd.lattice(size[0], 16), cd.lattice(size[1], 16)
    assert seen == [torch.Size([hs * ws, 4, ph // hs, pw // ws])]


@pytest.mark.parametrize("blend", ["uniform", "smooth"])
def test_stage2_windows_of_a_constant_model_give_the_constant_everywhere(sd15, blend):
    seen = []

    def constant(executor, x, t, *args, **kwargs):
        seen.append(x.shape)
        return torch.full_like(x, 2.5)

    model = add_probe(patch_split(sd15, switch_unit="sigma", switch_at=5.0, blend=blend), constant)
    out = apply(model, torch.randn(1, 4, 40, 24), STAGE2, torch.randn(1, 77, 768))
    assert out.shape == (1, 4, 40, 24)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))
    assert seen and all(s[-2:] == (16, 16) for s in seen)


@pytest.mark.parametrize("padding", cd.JITTER_PADDINGS)
def test_jittered_windows_see_the_mirrored_picture_or_the_reference_zero_strip(sd15, padding):
    """Reflect: every window input holds only values of the latent (a window moved into the margin sees
    the picture mirrored); zeros (reference): some window sees the noise-free zero strip."""
    inputs = []

    def record(executor, x, t, *args, **kwargs):
        inputs.append(x.clone())
        return x

    model = add_probe(patch_split(sd15, switch_unit="sigma", switch_at=5.0, jitter_padding=padding), record)
    x = torch.rand(1, 4, 48, 40) + 1.0  # every value in [1, 2): a zero can only come from padding
    out = apply(model, x, STAGE2, torch.randn(1, 77, 768))
    seen = torch.cat(inputs)
    assert seen.shape[-2:] == (16, 16) and len(inputs) >= 1
    if padding == "reflect":
        assert bool((seen >= 1.0).all())
        torch.testing.assert_close(out, x)  # mirrored margins are cropped away: identity model, identity result
    else:
        assert bool((seen == 0).any())


def test_pixel_interaction_permutation_is_shared_by_cond_and_uncond_and_fresh_per_step(sd15):
    seen = []

    def record(executor, x, t, *args, **kwargs):
        seen.append(x.clone())
        return x

    model = add_probe(cut_diffusion(sd15, switch_unit="sigma", switch_at=5.0, seed=4), record)
    x, context = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 768)
    apply(model, x, STAGE1, context, cond_or_uncond=[0])
    apply(model, x, STAGE1, context, cond_or_uncond=[1])
    apply(model, x, STAGE1 * 0.9, context, cond_or_uncond=[0])
    assert torch.equal(seen[0], seen[1])  # the separate cond and uncond passes of one step see one permutation
    assert not torch.equal(seen[0], seen[2])  # the next step draws a fresh one
    patches = cd.split_lattice(x, 2, 2).flatten(0, 1)
    assert not torch.equal(seen[0], patches)
    assert torch.equal(seen[0].sort(dim=0).values, patches.sort(dim=0).values)  # values are only moved across patches


def test_cond_and_uncond_batched_together_equal_separate_calls_in_any_group_size(sd15):
    """The batch layout keeps each cond/uncond chunk with its own text context: one batched call
    (cond + uncond, any number of patches per model call) equals separate calls."""
    x = torch.randn(1, 4, 24, 24)
    contexts = torch.randn(2, 77, 768)
    for sigma in (STAGE1, STAGE2):
        separate = None
        for max_batch in (0, 3):
            model = cut_diffusion(sd15, patch_size=12, switch_unit="sigma", switch_at=5.0, max_batch=max_batch)
            both = apply(model, x.repeat(2, 1, 1, 1), sigma, contexts, cond_or_uncond=[0, 1])
            if separate is None:
                separate = torch.cat([apply(model, x, sigma, contexts[i:i + 1], cond_or_uncond=[i]) for i in (0, 1)])
            torch.testing.assert_close(both, separate, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_full_cutdiffusion_samples_with_common_samplers(sd15, node_classes, sampler):
    batches = []

    def count(executor, x, *args, **kwargs):
        batches.append(x.shape[0])
        return executor(x, *args, **kwargs)

    model = add_probe(cut_diffusion(sd15, patch_size=12), count)
    out = ksample(node_classes, model, sampler)
    assert out.shape == (1, 4, 24, 24) and torch.isfinite(out).all()
    # cond+uncond in one call: 2x2 sub-lattice patches in stage 1, 3x3 windows in stage 2
    assert {2 * 4, 2 * 9} == set(batches), batches
    assert not torch.equal(out, ksample(node_classes, sd15, sampler))


def test_original_model_is_untouched_and_two_clones_do_not_influence_each_other(sd15, node_classes):
    before = ksample(node_classes, sd15, steps=2)
    a = cut_diffusion(sd15, patch_size=12, seed=1)
    b = patch_split(sd15, patch_size=12, switch_at=0.0, blend="smooth", seed=9)
    first_a = ksample(node_classes, a, steps=2)
    from_b = ksample(node_classes, b, steps=2)
    again_a = ksample(node_classes, a, steps=2)
    assert torch.equal(first_a, again_a) and not torch.equal(first_a, from_b)
    assert not sd15.get_wrappers(APPLY_MODEL, cd.KEY)
    assert cd.INTERACTION_KEY not in sd15.model_options.get("transformer_options", {})
    assert torch.equal(ksample(node_classes, sd15, steps=2), before)


def test_patch_split_applied_twice_keeps_only_the_last_settings(sd15):
    twice = patch_split(patch_split(sd15, patch_size=8), patch_size=16)
    (wrapper,) = twice.get_wrappers(APPLY_MODEL, cd.KEY)
    assert wrapper.patch == 16


def test_sdxl_size_conditioning_per_patch_and_window(sdxl):
    adm = []

    def record(executor, x, t, *args, **kwargs):
        adm.append(kwargs["y"].clone())
        return x

    model = add_probe(patch_split(sdxl, switch_unit="sigma", switch_at=5.0, jitter=False), record)
    x, context, pooled = torch.randn(1, 4, 32, 48), torch.randn(1, 77, 2048), torch.randn(1, 1280)
    y = sdxl.model.encode_adm(pooled_output=pooled, width=999, height=777, device="cpu")
    apply(model, x, STAGE1, context, y=y)
    apply(model, x, STAGE2, context, y=y)
    stage1, stage2 = adm
    embed = lambda *v: sdxl.model.embedder(torch.tensor(v, dtype=torch.float32)).flatten()
    full = embed(256, 384)  # 8 x the 32x48 latent
    assert stage1.shape == (2 * 3, 2816) and stage2.shape == (3 * 5, 2816)
    for row in torch.cat([stage1, stage2]):
        assert torch.equal(row[:1280], pooled[0])
        torch.testing.assert_close(row[1280:1792], full)
        torch.testing.assert_close(row[-512:], full)
    for row in stage1:
        torch.testing.assert_close(row[1792:2304], embed(0, 0))
    corners = [(y, x) for y in (0, 8, 16) for x in (0, 8, 16, 24, 32)]
    for row, (cy, cx) in zip(stage2, corners):
        torch.testing.assert_close(row[1792:2304], embed(8 * cy, 8 * cx))


def test_sdxl_window_crop_is_the_start_on_the_padded_canvas_as_the_reference(sdxl):
    """Reference (research note §2.4): crop = (8 h_start, 8 w_start) of the window on the canvas padded by the
    jitter, 16 latent px on a 2048 layout. The start on the unpadded image, clamped at 0, differs by up to 128 px."""
    adm = []
    model = add_probe(patch_split(sdxl, patch_size=128, switch_unit="sigma", switch_at=5.0, seed=7),
                      lambda executor, x, t, *args, **kwargs: adm.append(kwargs["y"].clone()) or x)
    x, context, pooled = torch.randn(1, 4, 256, 256), torch.randn(1, 77, 2048), torch.randn(1, 1280)
    apply(model, x, STAGE2, context, y=sdxl.model.encode_adm(pooled_output=pooled, width=2048, height=2048, device="cpu"))
    layout = cd.windows(256, 256, 128, 0.5, True, cd.step_generator(7, STAGE2))
    assert layout.pad == (16, 16) and len(layout.corners) == 9
    embed = lambda *v: sdxl.model.embedder(torch.tensor(v, dtype=torch.float32)).flatten()
    rows = torch.cat(adm)  # the windows, in as many model calls as free memory allows
    assert len(rows) == 9
    shifts = []
    for row, (cy, cx) in zip(rows, layout.corners):
        torch.testing.assert_close(row[1792:2304], embed(8 * cy, 8 * cx))
        shifts += [8 * c - 8 * max(0, c - 16) for c in (cy, cx)]
    assert max(shifts) == 128 and min(shifts) >= 0


def test_flux_patches_and_windows_run(flux):
    model = cut_diffusion(flux, switch_unit="sigma", switch_at=0.5)
    x, context = torch.randn(1, 16, 32, 32), torch.randn(1, 8, 32)
    for sigma in (0.9, 0.2):
        out = apply(model, x, sigma, context, y=torch.randn(1, 32), guidance=torch.full((1,), 3.5))
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_progress_per_window_batch_and_cancel_between_batches(sd15):
    calls, progress = [], []

    def cancel_after_first(executor, x, *args, **kwargs):
        calls.append(x.shape[0])
        comfy.model_management.interrupt_current_processing(True)
        return x

    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: progress.append((value, total)))
    try:
        model = patch_split(sd15, switch_unit="sigma", switch_at=5.0, max_batch=2)
        apply(add_probe(model.clone(), lambda executor, x, *a, **k: x), torch.randn(1, 4, 32, 32), STAGE2, torch.randn(1, 77, 768))
        assert progress == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]  # 9 windows, 2 per call
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            apply(add_probe(model, cancel_after_first), torch.randn(1, 4, 32, 32), STAGE2, torch.randn(1, 77, 768))
        assert calls == [2]
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)


def test_bad_inputs_are_reported_with_a_fix(sd15):
    with pytest.raises(UltraResInputError, match="Pixel Interaction.*'model'.*Fix: connect"):
        host.run_node(UltraResPixelInteraction, model=sd15, seed=0)
    with pytest.raises(UltraResInputError, match="'switch_at'"):
        patch_split(sd15, switch_at=2.0)
    with pytest.raises(UltraResInputError, match="'patch_size'"):
        patch_split(sd15, patch_size=4)
    with pytest.raises(cd.UnsupportedInput, match="ControlNet"):
        apply(patch_split(sd15), torch.randn(1, 4, 32, 32), STAGE2, torch.randn(1, 77, 768), control={"input": []})


def test_native_patch_size_comes_from_the_model_family(sd15, sdxl, flux):
    sizes = [patch_split(m, patch_size=0).get_wrappers(APPLY_MODEL, cd.KEY)[0].patch for m in (sd15, sdxl, flux)]
    assert sizes == [64, 128, 128]
