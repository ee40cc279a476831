"""UltraPixel on ComfyUI's StageC: the released weight layout, every step of TransInr against its
formula, the reference's sizes and tiers, the LR pass / HR guidance on a clone, and bad input."""

import math
import pathlib

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import host
import tiny_models
from ultrares.nodes import ultrapixel as node
from ultrares.nodes.common import UltraResInputError
from ultrares.patches import ultrapixel as up

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import folder_paths

FILE = "ultrapixel_t2i.safetensors"


def released(dtype=torch.bfloat16, device="meta", **widths) -> dict:
    """The released file's state dict: every key name, full shapes by default (meta: no memory)."""
    shapes = tiny_models.released_transinr_shapes(**widths)
    with torch.device(device):
        return {f"module.{g}.{j}.{name}": torch.empty(s, dtype=dtype) for g in ("64", "65") for j in "01" for name, s in shapes.items()}


def tiny_modules(**kwargs) -> up.UltraPixelModules:
    parts, problems = up.split_released(tiny_models.ultrapixel_state_dict(**kwargs))
    assert problems == []
    return up.build_modules(parts)


# ---- weight layout --------------------------------------------------------------------------

def test_released_layout_loads_at_full_size_on_meta():
    sd = released()
    assert len(sd) == 4 * 42  # 42 tensors per module (research notes 1.7)
    parts, problems = up.split_released(sd)
    assert problems == [] and sorted(parts) == sorted(up.HOOKS)
    modules = up.build_modules(parts)
    per_module = sum(torch.Size(s).numel() for s in tiny_models.released_transinr_shapes().values())
    assert per_module == 26_381_056  # 105.5M for the four = the 211 MB bf16 file
    unused = 2 * (2048 * 2048 + 2048)  # hr_norm.alpha / gamma: stored, never called
    assert sum(p.numel() for p in modules.parameters()) == 4 * (per_module - unused)
    inr = modules.agg_net_up[1]
    assert inr.shape == up.TransInrShape(ind=2048, ch=1024, tokens=1024, ff_dim=1024, pe_features=256, hidden=1024,
                                         groups=(64, 64), time_dim=64, scale_dim=64, fuse_dim=512)
    assert modules.max_tokens == 1024


def test_released_layout_without_prefix_and_refusals():
    sd = {k[len("module."):]: v for k, v in released().items()}
    assert up.split_released(sd)[1] == []
    sd.pop("64.1.wtokens")
    sd["66.0.foo"] = torch.empty(1, device="meta")
    problems = up.split_released(sd)[1]
    assert any("unexpected key '66.0.foo'" in p for p in problems)
    assert any("module.64.1 lacks 1 of its 38 tensors (e.g. wtokens)" in p for p in problems)


# ---- TransInr step by step -------------------------------------------------------------------

def test_tokenizer_is_unfold_prefc_posemb():
    inr = tiny_modules().agg_net[0]
    x = torch.randn(2, 32, 3, 5)
    unfold = F.unfold(x, 1).permute(0, 2, 1)  # the reference's patch-1 unfold
    expected = unfold @ inr.tokenizer.prefc.weight.T + inr.tokenizer.prefc.bias + inr.tokenizer.posemb[:15]
    torch.testing.assert_close(inr.tokenizer(x), expected)


def test_encoder_attention_is_silu_projections_softmax_no_output_projection():
    inr = tiny_modules().agg_net[0]
    layer = inr.transformer_encoder.layers[0]
    x = torch.randn(2, 7, 32)
    h = F.layer_norm(x, (32,), layer[0].norm.weight, layer[0].norm.bias)
    q = F.silu(h) @ layer[0].fn.to_q[1].weight.T + layer[0].fn.to_q[1].bias
    k, v = (F.silu(h) @ layer[0].fn.to_kv[1].weight.T + layer[0].fn.to_kv[1].bias).chunk(2, -1)
    heads = up.HEADS
    split = lambda t: t.view(2, 7, heads, 32 // heads).transpose(1, 2)
    attn = torch.softmax(split(q) @ split(k).transpose(-1, -2) * (32 // heads) ** -0.5, -1) @ split(v)
    x1 = x + attn.transpose(1, 2).reshape(2, 7, 32)
    ff = layer[1].fn.net
    h = F.layer_norm(x1, (32,), layer[1].norm.weight, layer[1].norm.bias)
    x2 = x1 + (F.gelu(h @ ff[0].weight.T + ff[0].bias) @ ff[3].weight.T + ff[3].bias)
    torch.testing.assert_close(inr.transformer_encoder(x), x2)


def test_weight_tokens_are_the_last_outputs_and_modulate_with_per_column_l2_norm():
    inr = tiny_modules().agg_net[1]
    lr = torch.randn(1, 32, 4, 4)
    tokens = inr.tokenizer(inr.input_layer(lr))
    out = inr.transformer_encoder(torch.cat([tokens, inr.wtokens[None]], 1))[:, -inr.wtokens.shape[0]:]
    g0 = inr.shape.groups[0]
    wb0, wb1 = inr.hyper_weights(lr)
    for wb, base, post, part in ((wb0, inr.base_params["wb0"], inr.wtoken_postfc["wb0"], out[:, :g0]),
                                 (wb1, inr.base_params["wb1"], inr.wtoken_postfc["wb1"], out[:, g0:])):
        m = post(part)[0]  # (g, in)
        g = m.shape[0]
        for j in (0, 1, g - 1, base.shape[1] - 1):  # output column j uses group j mod g
            col = base[:-1, j] * m[j % g]
            torch.testing.assert_close(wb[0, :-1, j], col / col.norm())
        torch.testing.assert_close(wb[0, -1], base[-1])  # the bias row is not modulated
        torch.testing.assert_close(wb[0, :-1].norm(dim=0), torch.ones(base.shape[1]))


def test_coordinates_positional_encoding_and_coordinate_mlp():
    grid = up.coordinate_grid(2, 4)
    torch.testing.assert_close(grid[..., 0], torch.tensor([[-0.5] * 4, [0.5] * 4]))  # y first, pixel centres
    torch.testing.assert_close(grid[1, :, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    pe = up.positional_encoding(grid, 256)
    freqs = torch.exp(torch.linspace(0, math.log(1024), 64))
    y, x = grid[1, 2]
    args = torch.cat([y * freqs, x * freqs])  # coordinate-major
    torch.testing.assert_close(pe[1, 2], torch.cat([torch.cos(math.pi * args), torch.sin(math.pi * args)]))
    inr = tiny_modules().agg_net[0]
    lr = torch.randn(1, 32, 3, 3)
    wb0, wb1 = inr.hyper_weights(lr)
    feats = torch.relu(torch.cat([pe.reshape(8, -1), torch.ones(8, 1)], 1) @ wb0[0])
    mlp = torch.cat([feats, torch.ones(8, 1)], 1) @ wb1[0]  # (8, ch)
    expected = (mlp.T.reshape(1, -1, 2, 4) * 0 + mlp.T.reshape(1, -1, 2, 4))
    expected = F.conv2d(expected, inr.output_layer.weight, inr.output_layer.bias) + F.interpolate(lr, (2, 4), mode="nearest")
    torch.testing.assert_close(inr.upsample(lr, (2, 4)), expected, rtol=1e-4, atol=1e-4)


def test_fusion_timestep_and_scale_conditioning():
    inr = tiny_modules().agg_net_up[0]
    target, lr = torch.randn(2, 32, 6, 6), torch.randn(2, 32, 3, 3)
    r = torch.tensor([0.3, 0.9])
    hr_rec = inr.upsample(lr, (6, 6))
    cat = torch.cat([hr_rec, target], 1).permute(0, 2, 3, 1)
    fused = (F.gelu(cat @ inr.toout[0].weight.T + inr.toout[0].bias) @ inr.toout[2].weight.T + inr.toout[2].bias).permute(0, 3, 1, 2)
    t_emb = up.sinusoid(r)
    a, b = (t_emb @ inr.mapp_t.mapper.weight.T + inr.mapp_t.mapper.bias)[:, :, None, None].chunk(2, 1)
    out = fused * (1 + a) + b
    out = (out - out.mean(1, keepdim=True)) / torch.sqrt(out.var(1, unbiased=False, keepdim=True) + 1e-6)
    s = math.sqrt(math.log(36) / math.log(576))
    a2, b2 = (up.sinusoid(torch.tensor([s, s])) @ inr.hr_norm.mapping.mapper.weight.T + inr.hr_norm.mapping.mapper.bias)[:, :, None, None].chunk(2, 1)
    torch.testing.assert_close(inr(target, lr, t_emb), out * (2 + a2) + b2, rtol=1e-4, atol=1e-4)


def test_sinusoid_scale_sizes_and_tiers():
    r = torch.tensor([0.05, 1.0])
    emb = up.sinusoid(r)
    freq = math.exp(-math.log(10000) / 31 * 5)
    assert emb.shape == (2, 64) and math.isclose(float(emb[0, 5]), math.sin(500 * freq), rel_tol=1e-4)
    assert math.isclose(float(emb[1, 32 + 5]), math.cos(10000 * freq), rel_tol=1e-3, abs_tol=1e-4)
    norm = up.ScaleNorm(4, 64)
    assert [round(norm.scale(s, s), 2) for s in (24, 48, 72, 96)] == [1.0, 1.1, 1.16, 1.2]
    assert up.hr_latent_size(4096, 4096) == (96, 96) and up.lr_latent_size(4096, 4096) == (24, 24)
    assert up.lr_pixel_size(2560, 5120) == (704, 1440) and up.lr_latent_size(2560, 5120) == (17, 34)
    assert up.hr_latent_size(2560, 5120) == (60, 120)
    assert [up.tier_weight(a) for a in (96 * 96, 96 * 96 - 1, 72 * 72, 60 * 120, 24 * 24)] == [0.7, 0.5, 0.5, 0.5, 0.3]
    assert up.scaled_tiers(24) == up.TIERS and up.scaled_tiers(8)[0] == (32 * 32, 0.7)


def test_cfg_rescale_in_eps_space():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    pred = uncond + 4 * (cond - uncond)
    expected = 0.7 * pred * cond.std() / pred.std() + 0.3 * pred
    torch.testing.assert_close(up.rescale_cfg(cond, uncond, 4.0, 0.7), expected)
    torch.testing.assert_close(up.rescale_cfg(3 * cond, 3 * uncond, 4.0, 0.7), 3 * expected)  # sigma * eps works too
    torch.testing.assert_close(up.rescale_cfg(cond, uncond, 4.0, 0.0), pred)


# ---- the loader --------------------------------------------------------------------------------

@pytest.fixture
def weights_dir():
    d = pathlib.Path(folder_paths.get_folder_paths(node.FOLDER)[0])
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_released(path, sd=None):
    """As published: a bf16 torch pickle under a .safetensors name."""
    torch.save({k: v.to(torch.bfloat16) for k, v in (sd or tiny_models.ultrapixel_state_dict()).items()}, path)


def load(model, name):
    return host.run_node(node.UltraPixelLoader, model=model, ultrapixel_name=name)[0]


def test_loader_reads_the_released_pickle_and_a_safetensors_conversion(weights_dir):
    save_released(weights_dir / FILE)
    safetensors.torch.save_file(tiny_models.ultrapixel_state_dict(), str(weights_dir / "ultrapixel_converted.safetensors"))
    base = tiny_models.tiny_stage_c()
    a, b = load(base, FILE), load(base, "ultrapixel_converted.safetensors")
    ma, mb = a.get_attachment(node.KEY), b.get_attachment(node.KEY)
    assert node.file_format(weights_dir / FILE) == "torch"
    assert next(ma.parameters()).dtype == torch.float32  # the StageC's dtype, from the bf16 file
    for (ka, va), (kb, vb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb.to(torch.bfloat16).float())
    assert base.get_attachment(node.KEY) is None and not base.additional_models  # the input model is untouched
    (extra,) = a.get_additional_models()
    assert extra.model is ma  # its own ModelPatcher: ComfyUI loads / offloads it with the StageC


def test_loader_refuses_other_files_clearly(weights_dir, tmp_path):
    base = tiny_models.tiny_stage_c()
    safetensors.torch.save_file({"model.diffusion_model.x": torch.zeros(2)}, str(weights_dir / "stage_b_lite.safetensors"))
    with pytest.raises(UltraResInputError, match=r"UltraPixel Loader: input 'ultrapixel_name': stage_b_lite.safetensors is not the "
                                                 r"UltraPixel guidance file: expected the keys module.64.0/1.\* .*Fix: pick ultrapixel_t2i"):
        load(base, "stage_b_lite.safetensors")
    (weights_dir / "garbage.safetensors").write_bytes(b"not a model at all")
    with pytest.raises(UltraResInputError, match="neither a safetensors file nor a torch file"):
        load(base, "garbage.safetensors")
    torch.save({"x": pathlib.PurePosixPath("/")}, weights_dir / "pickled_object.safetensors")  # not a plain tensor file
    with pytest.raises(UltraResInputError, match=r"torch.load\(weights_only=True\) cannot read"):
        load(base, "pickled_object.safetensors")
    save_released(weights_dir / "wide.safetensors", tiny_models.ultrapixel_state_dict(ind=64))
    with pytest.raises(UltraResInputError, match="made for a StageC 64 channels wide at down_blocks\\[0\\], this StageC has 32"):
        load(base, "wide.safetensors")


def test_loader_and_lr_pass_refuse_other_model_families(weights_dir, sd15, flux):
    save_released(weights_dir / FILE)
    for model, family in ((sd15, "BaseModel"), (flux, "Flux")):
        with pytest.raises(UltraResInputError, match=f"input 'model': this is a {family} model, not a Stable Cascade StageC"):
            load(model, FILE)
    with pytest.raises(UltraResInputError, match="UltraPixel LR Pass: input 'model': the StageC carries no UltraPixel modules"):
        lr_pass(tiny_models.tiny_stage_c())


# ---- the LR pass and the HR guidance ---------------------------------------------------------

POS, NEG = tiny_models.cascade_conditioning(1), tiny_models.cascade_conditioning(2)
STEPS = 3


def lr_pass(model, width=512, height=512, **changes):
    settings = dict(seed=0, steps=STEPS, cfg=4.0, sampler_name="euler_ancestral", scheduler="simple", shift=1.0,
                    cfg_rescale=0.7, batch_size=1) | changes
    return host.run_node(node.UltraPixelLRPass, model=model, positive=POS, negative=NEG, width=width, height=height, **settings)


def hr_sample(model, latent, seed=0):
    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    return comfy.sample.sample(model, noise, STEPS, 4.0, "euler_ancestral", "simple", POS, NEG, latent["samples"], seed=seed,
                               disable_pbar=True)


@pytest.fixture
def loaded(weights_dir):
    save_released(weights_dir / FILE)
    return load(tiny_models.tiny_stage_c(), FILE)


def test_lr_pass_records_the_conditional_features_at_the_last_step_and_sizes_the_hr_latent(loaded):
    model, hr, lr = lr_pass(loaded, width=768, height=512)
    assert tuple(hr["samples"].shape) == (1, 16, *up.hr_latent_size(512, 768)) == (1, 16, 12, 18)
    assert tuple(lr["samples"].shape) == (1, 16, *up.lr_latent_size(512, 768)) == (1, 16, 20, 30)
    hooks = {key: model.object_patches[node.hook_target(key)] for key in up.HOOKS}
    features = next(iter(hooks.values())).features
    assert features.complete and all(h.features is features for h in hooks.values())
    assert {tuple(f.shape) for f in features.features.values()} == {(1, 32, 20, 30)}
    # the last step's input is the noisy LR latent at t = 0.05 (simple schedule, 20 steps) / 0.33 here (3 steps)
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", STEPS)
    assert math.isclose(float(sampling.timestep(sigmas[-2])), 1 / 3, abs_tol=2e-3)
    assert math.isclose(float(sampling.timestep(comfy.samplers.calculate_sigmas(sampling, "simple", 20)[-2])), 0.05, abs_tol=2e-3)
    assert sampling.shift == 1.0 and "sampler_cfg_function" in model.model_options
    # both CFG halves get the conditional feature
    f = features.features[up.HOOKS[0]]
    both = features.batch_for(up.HOOKS[0], [1, 0], 2, f)
    torch.testing.assert_close(both[0], f[0]) and torch.testing.assert_close(both[1], f[0])


def test_lr_pass_below_denoise_1_runs_ksamplers_truncated_schedule(loaded):
    model, _, lr = lr_pass(loaded, denoise=0.6)
    features = next(iter(model.object_patches[node.hook_target(key)] for key in up.HOOKS)).features
    assert features.complete  # recorded at a sigma the sampler evaluated: the truncated schedule's last step
    sampling = model.get_model_object("model_sampling")
    truncated = node.pass_sigmas(model, "euler_ancestral", "simple", STEPS, 0.6)
    torch.testing.assert_close(truncated, comfy.samplers.calculate_sigmas(sampling, "simple", int(STEPS / 0.6))[-(STEPS + 1):])
    torch.testing.assert_close(node.pass_sigmas(model, "euler_ancestral", "simple", STEPS, 1.0), comfy.samplers.calculate_sigmas(sampling, "simple", STEPS))
    assert float(truncated[0]) < 99  # starts below StageC's sigma_max (100)
    # the samplers that drop the penultimate sigma record at the last sigma they really evaluate
    full = comfy.samplers.calculate_sigmas(sampling, "simple", STEPS + 1)
    torch.testing.assert_close(node.pass_sigmas(model, "uni_pc", "simple", STEPS, 1.0), torch.cat([full[:-2], full[-1:]]))
    assert not torch.equal(lr["samples"], lr_pass(loaded)[2]["samples"])


def test_recorded_feature_is_the_attn_block_output_of_the_cond_half():
    feats = up.LRFeatures()
    calls = []
    block = lambda x, clip, transformer_options={}: calls.append(1) or x * 2
    hook = up.GuidedBlock(block, up.HOOKS[0], feats, None, record_sigma=0.5)
    x = torch.arange(4.0).view(4, 1, 1, 1)
    assert torch.equal(hook(x, None, transformer_options={"sigmas": torch.tensor([0.9]), "cond_or_uncond": [1, 0]}), x * 2)
    assert not feats.features  # not the recorded step
    hook(x, None, transformer_options={"sigmas": torch.tensor([0.5]), "cond_or_uncond": [0]})  # an uncond-free batch of 4
    hook(x, None, transformer_options={"sigmas": torch.tensor([0.5]), "cond_or_uncond": [1]})  # uncond alone: ignored
    torch.testing.assert_close(feats.features[up.HOOKS[0]], x * 2)
    hook(x, None, transformer_options={"sigmas": torch.tensor([0.5]), "cond_or_uncond": [1, 0]})
    torch.testing.assert_close(feats.features[up.HOOKS[0]], x[2:] * 2)  # the rows of the cond chunk


def test_zero_output_layers_leave_stage_c_unchanged_and_trained_ones_change_it(weights_dir):
    parts, _ = up.split_released(tiny_models.ultrapixel_state_dict())
    sd = tiny_models.ultrapixel_state_dict()
    for key in sd:
        if key.split(".", 3)[3].startswith(("toout.2", "mapp_t.mapper", "hr_norm.mapping.mapper")):  # every output-side layer
            sd[key] = torch.zeros_like(sd[key])
    save_released(weights_dir / "zeroed.safetensors", sd)
    save_released(weights_dir / FILE)
    base = tiny_models.tiny_stage_c()
    plain = node.reference_sampling(base, 1.0, 0.7)
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    reference = hr_sample(plain, latent)
    zero_model, hr, _ = lr_pass(load(base, "zeroed.safetensors"), width=341, height=341)
    assert hr["samples"].shape[-1] == 8
    torch.testing.assert_close(hr_sample(zero_model, latent), reference)
    guided, _, _ = lr_pass(load(base, FILE), width=341, height=341)
    assert (hr_sample(guided, latent) - reference).abs().max() > 1e-3


def test_guidance_weights_and_controlnet_in_the_hr_pass(loaded):
    model, _, _ = lr_pass(loaded)
    down, upper = model.object_patches[node.hook_target(("down_blocks", 1))], model.object_patches[node.hook_target(("up_blocks", 0))]
    assert down.weight(96, 96) == 1.0 and [upper.weight(s, s) for s in (96, 72, 48)] == [0.7, 0.5, 0.3]
    seen = {}

    def executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw):
        seen["control"] = control
        return x

    node.without_control(executor, torch.zeros(1), torch.zeros(1), None, None, {"input": [torch.ones(1)]}, {})
    assert seen["control"] is None  # HR pass: ControlNet residuals skipped, as the reference does
    wrappers = model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, node.KEY)
    assert wrappers == [node.without_control]


def test_original_model_unchanged_and_reapplying_replaces(loaded):
    base_sd = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    before = hr_sample(loaded, latent)
    model, hr, _ = lr_pass(loaded)
    hr_sample(model, hr)
    after = hr_sample(loaded, latent)  # ComfyUI swaps the clone's patches out for the original's
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    block = loaded.model.diffusion_model.down_blocks[0][up.HOOK_BLOCK]
    assert not isinstance(block.forward, up.GuidedBlock)
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in base_sd.items())
    assert loaded.object_patches == {} and not loaded.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, node.KEY)
    again, _, _ = lr_pass(model)  # the guided MODEL through the LR pass once more: replaces, never stacks
    for key in up.HOOKS:
        hook = again.object_patches[node.hook_target(key)]
        assert isinstance(hook, up.GuidedBlock) and not isinstance(hook.original, up.GuidedBlock)
    assert len(again.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, node.KEY)) == 1


def test_lr_tokens_beyond_the_modules_limit_get_a_clear_error(weights_dir):
    save_released(weights_dir / "small_posemb.safetensors", tiny_models.ultrapixel_state_dict(tokens=500))
    model = load(tiny_models.tiny_stage_c(), "small_posemb.safetensors")
    with pytest.raises(UltraResInputError, match=r"UltraPixel LR Pass: input 'width': the LR latent 24x24 has 576 tokens but the "
                                                 r"UltraPixel modules take at most 500"):
        lr_pass(model, width=4096, height=4096)
