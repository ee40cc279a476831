"""URAE (Ultra-Resolution Adaptation with Ease) for FLUX: NTK-scaled RoPE, proportional attention
and the 4K "minor-component" adapter, as pure torch pieces that ComfyUI's ModelPatcher mechanisms
carry (object patch, DIFFUSION_MODEL wrapper, weight patches).

Reference: Huage001/URAE (transformer_flux.py, attention_processor.py, inference_4k.ipynb)."""

import math
import re
from typing import Callable

import torch

# Joint sequence length FLUX was trained at: 512 text tokens + 64x64 image tokens (1024x1024).
TRAIN_TOKENS = 512 + 64 * 64
OVERRIDE_KEY = "optimized_attention_override"


def ntk_pe_embedder(embedder: torch.nn.Module, base_theta: float, ntk_factor: float) -> torch.nn.Module:
    """A new position embedder of the same class with theta = base_theta * ntk_factor on every axis
    (diffusers' ntk_factor: theta_eff = theta * factor, freq_i = theta_eff^(-2i/d))."""
    return type(embedder)(dim=embedder.dim, theta=base_theta * ntk_factor, axes_dim=list(embedder.axes_dim))


def proportional_attention_scale(tokens: int, train_tokens: int = TRAIN_TOKENS) -> float:
    """Logit multiplier sqrt(log_train_tokens(N)): URAE's SDPA scale sqrt(log_4608(N) / head_dim)
    divided by the default 1/sqrt(head_dim). Below 1 for sequences shorter than the training one."""
    return math.sqrt(math.log(tokens) / math.log(train_tokens))


class ProportionalAttention:
    """An `optimized_attention_override`: multiplies the queries by the proportional-attention scale of
    the joint (text + image) key length, then hands over to the override it replaced, if any."""

    def __init__(self, previous: Callable | None = None, train_tokens: int = TRAIN_TOKENS):
        self.previous = previous
        self.train_tokens = train_tokens

    def __call__(self, func, *args, **kwargs):
        q, k = args[0], args[1]
        tokens = k.shape[2] if kwargs.get("skip_reshape", False) else k.shape[1]
        args = (q * proportional_attention_scale(tokens, self.train_tokens),) + args[1:]
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)


def proportional_attention_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper for comfy.ldm.flux.model.Flux.forward(x, timestep, context, y, guidance,
    ref_latents, control, transformer_options, ...): installs ProportionalAttention for this call only,
    in a copy of transformer_options, chained in front of any override already there."""
    TRANSFORMER_OPTIONS = 7
    if "transformer_options" in kwargs:
        options = dict(kwargs["transformer_options"])
        kwargs = dict(kwargs, transformer_options=options)
    else:
        options = dict(args[TRANSFORMER_OPTIONS])
        args = args[:TRANSFORMER_OPTIONS] + (options,) + args[TRANSFORMER_OPTIONS + 1:]
    options[OVERRIDE_KEY] = ProportionalAttention(options.get(OVERRIDE_KEY))
    return executor(*args, **kwargs)


# ---- 4K minor-component adapter -------------------------------------------------------------------

_ADAPTER_KEY = re.compile(r"^(?:transformer\.)?((?:single_)?transformer_blocks\.\d+\.attn)\.processor\.(to_q|to_k|to_v|to_out)_(a|b)\.weight$")


def parse_minor_component_adapter(adapter: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`urae_4k_adapter` keys ({single_,}transformer_blocks.i.attn.processor.to_q_a.weight ...) to
    {diffusers module name (transformer_blocks.i.attn.to_q, ...to_out.0): (A [r, in], B [out, r])}."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in adapter.items():
        match = _ADAPTER_KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        block, proj, half = match.groups()
        module = f"{block}.{proj}" + (".0" if proj == "to_out" else "")
        pairs.setdefault(module, {})[half] = value
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not URAE 4K adapter keys (first: {unknown[0]!r}); "
                         "expected '...transformer_blocks.<i>.attn.processor.to_q_a.weight' and the like")
    if not pairs:
        raise ValueError("the file holds no URAE 4K adapter keys")
    out = {}
    for module, halves in sorted(pairs.items()):
        if set(halves) != {"a", "b"}:
            raise ValueError(f"{module}: the adapter has only the '{''.join(halves)}' half of the a/b pair")
        a, b = halves["a"], halves["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{module}: a {tuple(a.shape)} and b {tuple(b.shape)} are not a low-rank pair [r, in] / [out, r]")
        out[module] = (a, b)
    return out


def minor_components(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B0 [out, r], A0 [r, in] spanning the `rank` smallest singular directions of `weight` (float32 SVD):
    B0 = U[:, -r:] sqrt(S[-r:]), A0 = sqrt(S[-r:]) V[-r:, :]. URAE trains the 4K adapter from here."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = s[-rank:].sqrt()
    return u[:, -rank:] * root, root[:, None] * vh[-rank:]


def minor_component_lora(adapter: dict[str, torch.Tensor], fused_weight: Callable[[str], torch.Tensor],
                         on_module: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """The 4K adapter as a stock diffusers LoRA ("transformer.<module>.lora_A/B.weight") whose product is
    B4k A4k - B0 A0, so that the effective weight becomes W' - B0 A0 + B4k A4k with W' the current (2K-fused)
    weight: the reference's W_major + B4k A4k. `fused_weight(module)` returns W' [out, in] for a diffusers
    module name; it is decomposed per module, i.e. per 3072-row slice of FLUX's fused qkv / linear1."""
    lora = {}
    for module, (a, b) in parse_minor_component_adapter(adapter).items():
        weight = fused_weight(module)
        if tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise ValueError(f"{module}: the adapter is for a [{b.shape[0]}, {a.shape[1]}] weight, the model's is {list(weight.shape)}")
        b0, a0 = minor_components(weight, a.shape[0])
        lora[f"transformer.{module}.lora_A.weight"] = torch.cat([a.to(a0), -a0], dim=0).cpu()
        lora[f"transformer.{module}.lora_B.weight"] = torch.cat([b.to(b0), b0], dim=1).cpu()
        if on_module is not None:
            on_module()
    return lora
