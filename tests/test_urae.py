"""URAE on the real host with a tiny FLUX: the patch is exact where it should be a no-op, its RoPE and
attention scale follow URAE's formulas, the sampling shift is the reference one, the 2K adapter's key
layout loads through the stock LoRA loader, and the 4K loader swaps the minor singular components."""

import math

import pytest
import safetensors.torch
import torch

import comfy.lora
import comfy.model_management
import comfy.supported_models
import host
import tiny_models
from ultrares.nodes.common import UltraResInputError
from ultrares.nodes.urae import URAE4KAdapterLoader, URAEFlux
from ultrares.patches import urae

HIDDEN, RANK = tiny_models.FLUX_DIT["hidden_size"], tiny_models.URAE_RANK
urae_2k_adapter, urae_4k_adapter = tiny_models.urae_2k_adapter, tiny_models.urae_4k_adapter
TEXT_TOKENS = 8


def patch(model, ntk_factor=10.0, proportional_attention=True, sampling_shift=True, preset="2K (2048x2048)"):
    return host.run_node(URAEFlux, model=model, preset=preset, ntk_factor=ntk_factor,
                         proportional_attention=proportional_attention, sampling_shift=sampling_shift)


def flux_cond(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, TEXT_TOKENS, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}]]


def sample(node_classes, model, size=16, steps=2):
    latent = {"samples": torch.zeros(1, 16, size, size)}
    out = host.run_node(node_classes["KSampler"], model=model, seed=0, steps=steps, cfg=1.0, sampler_name="euler",
                        scheduler="simple", positive=flux_cond(), negative=flux_cond(2), latent_image=latent, denoise=1.0)
    return out[0]["samples"]


def test_factor_1_without_proportional_attention_is_the_unpatched_model(node_classes, flux):
    reference = sample(node_classes, flux)
    patched = patch(flux, ntk_factor=1.0, proportional_attention=False, sampling_shift=False)[0]
    assert "diffusion_model.pe_embedder" in patched.object_patches  # the embedder is replaced, by an identical one
    assert torch.equal(sample(node_classes, patched), reference)
    urae_out = sample(node_classes, patch(flux)[0])
    assert (urae_out - reference).abs().max() > 1e-3
    assert torch.equal(sample(node_classes, flux), reference), "patching leaked into the original model"


def test_rope_frequencies_follow_the_ntk_formula(flux):
    model, width, height = patch(flux, ntk_factor=10.0)
    assert (width, height) == (2048, 2048)
    embedder = model.get_model_object("diffusion_model.pe_embedder")
    assert embedder is not flux.get_model_object("diffusion_model.pe_embedder")
    positions = torch.tensor([[[0.0, 3.0, 5.0], [0.0, 17.0, 2.0]]])
    pe = embedder(positions)[0, 0]  # [tokens, sum(axes_dim)/2, 2, 2]
    theta = 10000 * 10.0
    column = 0
    for axis, dim in enumerate(tiny_models.FLUX_DIT["axes_dim"]):
        for i in range(dim // 2):
            omega = theta ** (-2 * i / dim)
            for token in range(positions.shape[1]):
                angle = positions[0, token, axis].item() * omega
                expected = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
                assert torch.allclose(pe[token, column], expected, atol=1e-5), (axis, i, token)
            column += 1
    # re-applying the node starts again from FLUX's own theta instead of compounding
    again = patch(model, ntk_factor=10.0)[0]
    assert again.get_model_object("diffusion_model.pe_embedder").theta == theta
    assert len(again.get_wrappers("diffusion_model", "ultrares.urae")) == 1


def test_attention_scale_is_sqrt_log_4608_of_the_token_count(node_classes, flux):
    """A probe attention override (ComfyUI's own mechanism) sees the queries after URAE's override."""
    seen = {}

    def probe(func, *args, **kwargs):
        seen.setdefault("q", args[0].clone())
        seen.setdefault("tokens", args[1].shape[2])
        return func(*args, **kwargs)

    def with_probe(model):
        m = model.clone()
        m.model_options["transformer_options"]["optimized_attention_override"] = probe
        return m

    size = 16
    sample(node_classes, with_probe(flux), size=size, steps=1)
    plain_q = seen.pop("q")
    tokens = seen.pop("tokens")
    assert tokens == TEXT_TOKENS + (size // 2) ** 2
    sample(node_classes, with_probe(patch(flux, ntk_factor=1.0, sampling_shift=False)[0]), size=size, steps=1)
    scale = math.sqrt(math.log(tokens) / math.log(4608))
    assert urae.proportional_attention_scale(tokens) == pytest.approx(scale)
    assert torch.allclose(seen["q"], plain_q * scale, atol=1e-6), "queries are not scaled by sqrt(log_4608 N)"


def test_sampling_shift_is_the_reference_one(flux):
    dev = patch(flux)[0].get_model_object("model_sampling")
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(dev.sigma(t), 3 * t / (1 + 2 * t), atol=1e-6)
    assert patch(flux, sampling_shift=False)[0].get_model_object("model_sampling") is flux.get_model_object("model_sampling")
    schnell = tiny_models._build(comfy.supported_models.FluxSchnell, dict(tiny_models.FLUX_DIT, guidance_embed=False), 0)
    assert "model_sampling" not in patch(schnell)[0].object_patches


def test_a_non_flux_model_is_refused_clearly(sd15):
    with pytest.raises(UltraResInputError, match="URAE FLUX patch: input 'model'.*not FLUX.1"):
        patch(sd15)


# ---- adapters ------------------------------------------------------------------------------------------

def save_lora(name, sd):
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(host.BASE_DIRECTORY / "models" / "loras" / name))
    return name


# diffusers module -> (ComfyUI weight, row offset) for the tiny model
TARGETS = {
    "transformer_blocks.0.attn.to_q": ("diffusion_model.double_blocks.0.img_attn.qkv.weight", 0),
    "transformer_blocks.0.attn.to_k": ("diffusion_model.double_blocks.0.img_attn.qkv.weight", HIDDEN),
    "transformer_blocks.0.attn.to_v": ("diffusion_model.double_blocks.0.img_attn.qkv.weight", 2 * HIDDEN),
    "transformer_blocks.0.attn.to_out.0": ("diffusion_model.double_blocks.0.img_attn.proj.weight", None),
    "single_transformer_blocks.0.attn.to_q": ("diffusion_model.single_blocks.0.linear1.weight", 0),
    "single_transformer_blocks.0.attn.to_k": ("diffusion_model.single_blocks.0.linear1.weight", HIDDEN),
    "single_transformer_blocks.0.attn.to_v": ("diffusion_model.single_blocks.0.linear1.weight", 2 * HIDDEN),
}


def effective(model, module):
    """A module's weight with every patch of `model` applied (what sampling uses)."""
    key, row = TARGETS[module]
    entry = model.get_key_patches("diffusion_model.")[key]
    with torch.no_grad():
        w = comfy.lora.calculate_weight(entry[1:], entry[0][0].float().clone(), key)
    return w if row is None else w[row:row + HIDDEN]


def test_2k_adapter_layout_loads_with_the_stock_lora_loader(node_classes, flux):
    sd = urae_2k_adapter()
    loaded = host.run_node(node_classes["LoraLoaderModelOnly"], model=flux, lora_name=save_lora("urae_2k_adapter.safetensors", sd), strength_model=1.0)[0]
    assert set(loaded.patches) == {key for key, _ in TARGETS.values()}, "the 2K adapter must patch exactly the image-stream attention"
    assert len(loaded.patches["diffusion_model.double_blocks.0.img_attn.qkv.weight"]) == 3  # q, k, v slices
    for module, (key, row) in TARGETS.items():
        base = flux.get_model_object(key[:-len(".weight")]).weight.detach().float()
        base = base if row is None else base[row:row + HIDDEN]
        delta = sd[f"transformer.{module}.lora_B.weight"] @ sd[f"transformer.{module}.lora_A.weight"]
        assert torch.allclose(effective(loaded, module), base + delta, atol=1e-5), module
    text_qkv = "diffusion_model.double_blocks.0.txt_attn.qkv.weight"
    assert text_qkv not in loaded.patches


def test_4k_adapter_replaces_the_minor_singular_components(node_classes, flux):
    with_2k = host.run_node(node_classes["LoraLoaderModelOnly"], model=flux, lora_name=save_lora("urae_2k_adapter.safetensors", urae_2k_adapter()), strength_model=1.0)[0]
    sd = urae_4k_adapter()
    name = save_lora("urae_4k_adapter.safetensors", sd)
    with_4k = host.run_node(URAE4KAdapterLoader, model=with_2k, adapter_name=name, strength=1.0, require_2k_adapter=True)[0]
    assert with_4k is not with_2k and set(with_4k.patches) == set(with_2k.patches)
    for module in TARGETS:
        fused = effective(with_2k, module)
        u, s, vh = torch.linalg.svd(fused)
        minor = u[:, -RANK:] @ torch.diag(s[-RANK:]) @ vh[-RANK:]
        proj = module.split(".attn.")[1].split(".")[0]
        block = module.split(".attn.")[0]
        b4k_a4k = sd[f"{block}.attn.processor.{proj}_b.weight"] @ sd[f"{block}.attn.processor.{proj}_a.weight"]
        assert torch.allclose(effective(with_4k, module), fused - minor + b4k_a4k, atol=1e-4), module


def test_an_untrained_4k_adapter_changes_nothing(node_classes, flux):
    """At its initialisation (A, B = the minor components themselves) the adapter reproduces W'."""
    with_2k = host.run_node(node_classes["LoraLoaderModelOnly"], model=flux, lora_name=save_lora("urae_2k_adapter.safetensors", urae_2k_adapter()), strength_model=1.0)[0]
    init = {}
    for module in TARGETS:
        b0, a0 = urae.minor_components(effective(with_2k, module), RANK)
        block, proj = module.split(".attn.")[0], module.split(".attn.")[1].split(".")[0]
        init[f"{block}.attn.processor.{proj}_a.weight"], init[f"{block}.attn.processor.{proj}_b.weight"] = a0, b0
    with_4k = host.run_node(URAE4KAdapterLoader, model=with_2k, adapter_name=save_lora("urae_4k_init.safetensors", init), strength=1.0, require_2k_adapter=True)[0]
    for module in TARGETS:
        assert torch.allclose(effective(with_4k, module), effective(with_2k, module), atol=1e-5), module


def test_4k_loader_refuses_missing_2k_adapter_and_wrong_shapes(node_classes, flux):
    name = save_lora("urae_4k_adapter.safetensors", urae_4k_adapter())
    with pytest.raises(UltraResInputError, match="input 'model'.*2K adapter is not loaded"):
        host.run_node(URAE4KAdapterLoader, model=flux, adapter_name=name, strength=1.0, require_2k_adapter=True)
    wrong = {k: torch.zeros(v.shape[0] * 2 if k.endswith("_b.weight") else v.shape[0], v.shape[1] * (2 if k.endswith("_a.weight") else 1)) for k, v in urae_4k_adapter().items()}
    with pytest.raises(UltraResInputError, match="adapter_name.*is for a \\[128, 128\\] weight"):
        host.run_node(URAE4KAdapterLoader, model=flux, adapter_name=save_lora("urae_4k_big.safetensors", wrong), strength=1.0, require_2k_adapter=False)
    with pytest.raises(UltraResInputError, match="adapter_name.*not URAE 4K adapter keys"):
        host.run_node(URAE4KAdapterLoader, model=flux, adapter_name=save_lora("urae_2k_as_4k.safetensors", urae_2k_adapter()), strength=1.0, require_2k_adapter=False)
