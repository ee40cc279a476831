"""ScaleCrafter (He et al., ICLR 2024) as model patches: re-dilated 3x3 convolutions, dispersed
(5x5) convolutions and noise-damped classifier-free guidance, re-implemented from the method's
definition and the reference configs (see README, "ScaleCrafter").

Mechanics. Each target conv of the UNet gets an object patch on its `forward` (a `RedilatedConv`),
which looks up the conv's dilation for the current UNet call in a context variable. The APPLY_MODEL
wrapper (`Redilation`) computes that per-call plan from the sigma, the latent size and the pass
(main or noise-damped) and sets the variable only for the duration of the call. No module attribute
is ever changed, so the shared model stays untouched even while a patched clone samples.

Levels are numbered from the outermost (0, full latent resolution) to the deepest. A dilation table
maps slots to factors: "in<l>"/"out<l>" are the ResBlock convs of input/output level l,
"down<l>" the downsampler conv of input level l, "up<l>" the upsampler conv closing output level l
(it runs at level l-1's resolution), "mid" the middle block's ResBlocks.
"""

import contextvars
import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from .schedule import is_first_step

Table = Mapping[str, float]

# ---------------------------------------------------------------------------------------------
# Operators


def redilated_conv(x, weight, bias, stride, groups, dilation: float, out_size) -> torch.Tensor:
    """The reference's re-dilation operator for a (2k+1)x(2k+1) kernel and a perception-field
    factor `dilation` >= 0: enlarge the input bilinearly by ceil(d)/d, convolve with integer
    dilation ceil(d) and "same" zero padding, resize the output bilinearly to `out_size` (the size
    the conv produces normally). For an integer d both resizes are identities and are skipped."""
    dil = math.ceil(dilation - 1e-9)
    factor = dil / dilation
    if factor != 1.0:
        h, w = x.shape[-2:]
        x = F.interpolate(x, size=(round(h * factor), round(w * factor)), mode="bilinear", align_corners=False)
    y = F.conv2d(x, weight, bias, stride=stride, padding=dil * (weight.shape[-1] // 2), dilation=dil, groups=groups)
    if tuple(y.shape[-2:]) != tuple(out_size):
        y = F.interpolate(y, size=tuple(out_size), mode="bilinear", align_corners=False)
    return y


def conv_output_size(conv: torch.nn.Conv2d, size) -> tuple[int, int]:
    """What the un-patched conv returns for an input of spatial `size` (odd sizes included)."""
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(size, conv.padding, conv.dilation, conv.kernel_size, conv.stride)
    )


def _bilinear_upsample_matrix(n: int, scale: int) -> torch.Tensor:
    """Align-corners bilinear upsampling of n samples to scale*(n-1)+1, as a matrix."""
    up = torch.zeros(scale * (n - 1) + 1, n, dtype=torch.float64)
    for i in range(up.shape[0]):
        lo, frac = divmod(i, scale)
        up[i, lo] += 1 - frac / scale
        if frac:
            up[i, lo + 1] += frac / scale
    return up


def _responses(inputs, kernels):
    """Rows: (input, output pixel); columns: kernel basis element. Zero "same" padding."""
    out = F.conv2d(inputs[:, None], kernels[:, None], padding=kernels.shape[-1] // 2)
    return out.permute(0, 2, 3, 1).reshape(-1, kernels.shape[0])


@functools.lru_cache(maxsize=None)
def dispersion_matrix(small: int = 3, large: int = 5, input_size: int = 3, scale: int = 2, eta: float = 0.05) -> torch.Tensor:
    """The dispersion transform R (large^2 x small^2, float64): b = R a maps a small kernel a to the
    large kernel b minimising, over every basis input x,
      |corr(Up(x), b) - Up(corr(x, a))|^2 + eta^2 |corr(x, b) - corr(x, a)|^2
    (structure-level and pixel-level calibration; Up = align-corners bilinear upsampling by `scale`,
    corr = cross-correlation with zero "same" padding). Kernels are vectorised row-major."""
    up = _bilinear_upsample_matrix(input_size, scale)
    basis = lambda k: torch.eye(k * k, dtype=torch.float64).view(k * k, k, k)
    inputs, small_k, large_k = basis(input_size), basis(small), basis(large)
    struct_b = _responses(up @ inputs @ up.T, large_k)
    small_out = F.conv2d(inputs[:, None], small_k[:, None], padding=small // 2)  # (input, a element, y, x)
    struct_a = (up @ small_out @ up.T).permute(0, 2, 3, 1).reshape(-1, small * small)
    pixel_b, pixel_a = _responses(inputs, large_k), _responses(inputs, small_k)
    lhs = struct_b.T @ struct_b + eta**2 * pixel_b.T @ pixel_b
    return torch.linalg.solve(lhs, struct_b.T @ struct_a + eta**2 * pixel_b.T @ pixel_a)


def disperse_kernel(weight: torch.Tensor) -> torch.Tensor:
    """3x3 kernels -> 5x5 dispersed kernels (the same R for every output/input channel pair)."""
    r = dispersion_matrix().to(device=weight.device, dtype=weight.dtype)
    out_ch, in_ch = weight.shape[:2]
    return (weight.reshape(out_ch, in_ch, 9) @ r.T).reshape(out_ch, in_ch, 5, 5)


# ---------------------------------------------------------------------------------------------
# Where the target convs are in a ComfyUI (LDM layout) UNet


@dataclass(frozen=True)
class ConvSite:
    path: str  # below diffusion_model
    slot: str  # table slot, e.g. "in2", "down1", "mid", "out3", "up3"


def unet_conv_sites(unet_config: Mapping) -> tuple[ConvSite, ...]:
    """The 3x3 convs ScaleCrafter may re-dilate (ResBlock conv1/conv2, down/upsampler convs; never
    the stem, the output conv or 1x1 shortcuts), derived from a ComfyUI UNet config the way
    openaimodel.UNetModel builds its blocks."""
    levels = len(unet_config["channel_mult"])
    res_blocks = unet_config["num_res_blocks"]
    res_blocks = [res_blocks] * levels if isinstance(res_blocks, int) else list(res_blocks)
    depth_out = list(unet_config["transformer_depth_output"])
    attention_blocks = unet_config.get("num_attention_blocks")
    resblock = lambda prefix, slot: [ConvSite(f"{prefix}.in_layers.2", slot), ConvSite(f"{prefix}.out_layers.3", slot)]

    sites, block = [], 1
    for level in range(levels):
        for _ in range(res_blocks[level]):
            sites += resblock(f"input_blocks.{block}.0", f"in{level}")
            block += 1
        if level != levels - 1:
            sites.append(ConvSite(f"input_blocks.{block}.0.op", f"down{level}"))
            block += 1
    depth_middle = unet_config["transformer_depth_middle"]
    if depth_middle >= -1:
        sites += resblock("middle_block.0", "mid")
    if depth_middle >= 0:
        sites += resblock("middle_block.2", "mid")
    block = 0
    for level in reversed(range(levels)):
        for i in range(res_blocks[level] + 1):
            attention = depth_out.pop() > 0 and (attention_blocks is None or i < attention_blocks[level])
            sites += resblock(f"output_blocks.{block}.0", f"out{level}")
            if level and i == res_blocks[level]:
                sites.append(ConvSite(f"output_blocks.{block}.{2 if attention else 1}.conv", f"up{level}"))
            block += 1
    return tuple(sites)


# ---------------------------------------------------------------------------------------------
# Dilation tables


def table(spec: str) -> dict[str, float]:
    """'in1 down1:2; mid out3:4' -> {'in1': 2, 'down1': 2, 'mid': 4, 'out3': 4}."""
    out = {}
    for group in filter(None, (g.strip() for g in spec.split(";"))):
        slots, d = group.rsplit(":", 1)
        out.update({s: float(d) for s in slots.split()})
    return out


def slot_level(slot: str, levels: int) -> int:
    """The level a slot belongs to; the middle block counts as one below the deepest."""
    return levels if slot == "mid" else int(slot[len(slot.rstrip("0123456789")):])


def auto_table(levels: int, ratio: float) -> dict[str, float]:
    """The rule the reference tables follow: the deepest level and the middle block get the
    resolution ratio r, each shallower level one less but at least min(r, 2); the outermost level
    (full latent resolution) is left alone. r = 2 -> 2 everywhere, r = 4 -> 4/3/2 (SD1.5 tables)."""
    if ratio <= 1.0:
        return {}
    out = {"mid": ratio}
    for level in range(1, levels):
        d = max(ratio - (levels - 1 - level), min(ratio, 2.0))
        out.update({f"{kind}{level}": d for kind in ("in", "down", "out", "up")})
    return out


def milder_table(main: Table, levels: int) -> dict[str, float]:
    """Noise-damped table where the reference has none: the main table without its shallowest
    dilated level (exactly how the SD1.5 and SD2.1 2048 damped tables relate to their main ones)."""
    dilated = [slot_level(s, levels) for s, d in main.items() if d > 1 and s != "mid"]
    if not dilated:
        return dict(main)
    drop = min(dilated)
    return {s: d for s, d in main.items() if slot_level(s, levels) != drop}


def top_slots(main: Table) -> frozenset:
    """Dispersion set where the reference has none: the slots at the table's largest dilation
    (reproduces the SD2.1 2048 and SDXL 4096 dispersion lists)."""
    peak = max(main.values(), default=1.0)
    return frozenset(s for s, d in main.items() if d == peak and d > 1)


@dataclass(frozen=True)
class Preset:
    """One reference config: tables for a UNet of `family` with `levels` levels (4: SD1.x/2.x, 3:
    SDXL). `main`/`damped` are what the reference runs; `intended_*` (SDXL only) read the reference's
    block names as meant: its configs name down_blocks.3, which SDXL lacks, so the deepest input level
    (in2) stays undilated at 2048/2560 and at 3 instead of 4 at 4096x2048, and the damped tables skip it."""

    family: str  # model_family() of the models the config was written for
    levels: int
    main: str
    end_percent: float  # dilate_tau / 50
    progressive: bool
    ndcfg: bool = False  # the reference runs noise-damped guidance (ndcfg_tau = dilate_tau > 0)
    damped: str | None = None  # ndcfg_dilate_settings (None: milder_table rule)
    disperse: str | None = None  # disperse_settings (None: top_slots rule)
    intended_main: str | None = None
    intended_damped: str | None = None

    def tables(self, intended: bool = False) -> tuple[dict, dict, frozenset]:
        main = table(self.intended_main if intended and self.intended_main else self.main)
        damped_spec = self.intended_damped if intended and self.intended_damped else self.damped
        damped = table(damped_spec) if damped_spec else milder_table(main, self.levels)
        disperse = frozenset(table(self.disperse + ":1")) if self.disperse else top_slots(main)
        return main, damped, disperse


_SD_ALL = "in1 down1 in2 down2 in3 mid out3 up3 out2 up2 out1 up1"
_SD_2048 = "in1 down1 out1 up1:2; in2 down2 out2 up2:3; in3 mid out3 up3:4"
_SD21_2048_DAMPED = "in2 out1 up1:3; down2 in3 mid out3 up3 out2 up2:4"
_SD_DISPERSE = "down2 in3 mid out3 up3 out2 up2"
_XL_4096 = "in2 mid out2 up2:4; out1 up1:3; out0:2"
_XL_DAMPED, _XL_DAMPED_INTENDED = "mid out2 up2:2", "in2 mid out2 up2:2"

SD1, SD2, SDXL = "SD1.x", "SD2.x", "SDXL"
PRESETS: dict[str, Preset] = {
    "SD1.5 1024x1024": Preset(SD1, 4, f"{_SD_ALL}:2", 0.60, False),
    "SD1.5 1280x1280": Preset(SD1, 4, f"{_SD_ALL}:2.5", 0.70, False),
    "SD1.5 2048x2048 / 2048x1024": Preset(SD1, 4, _SD_2048, 0.70, True, ndcfg=True,
                                          damped="in2 down2 out2 up2:3; in3 mid out3 up3:4", disperse=_SD_DISPERSE),
    "SD2.1 1024x1024": Preset(SD2, 4, f"{_SD_ALL}:2", 0.40, False),
    "SD2.1 1280x1280": Preset(SD2, 4, f"{_SD_ALL}:2.5", 0.60, False),
    "SD2.1 2048x1024": Preset(SD2, 4, _SD_2048, 0.74, True, damped=_SD21_2048_DAMPED),  # ndcfg_tau 0 in the reference
    "SD2.1 2048x2048": Preset(SD2, 4, f"{_SD21_2048_DAMPED}; out0:2", 0.74, True, ndcfg=True, damped=_SD21_2048_DAMPED,
                              disperse=_SD_DISPERSE),
    "SDXL 2048x2048": Preset(SDXL, 3, "mid out2 up2:2", 0.60, False, intended_main="in2 mid out2 up2:2"),
    "SDXL 2560x2560": Preset(SDXL, 3, "mid out2 up2:2.5", 0.60, False, intended_main="in2 mid out2 up2:2.5"),
    "SDXL 4096x2048": Preset(SDXL, 3, "mid out2 up2:4; in2 out1 up1:3; out0:2", 0.70, True, ndcfg=True, damped=_XL_DAMPED,
                             intended_main=_XL_4096, intended_damped=_XL_DAMPED_INTENDED),
    "SDXL 4096x4096": Preset(SDXL, 3, _XL_4096, 0.70, True, ndcfg=True, damped=_XL_DAMPED, intended_damped=_XL_DAMPED_INTENDED),
}


# Progressive decay shapes: the reference's integer steps, or a fractional cosine fade that holds
# the full field while the layout forms and eases toward the floor as detail is drawn.
DECAYS = ("reference", "cosine to 2", "cosine to 1")


def progressive_dilation(d: float, done: float, decay: str = "reference") -> float:
    """The factor after `done` = i / tau of the window's steps. The reference's decay:
    d_i = max(ceil(d (tau - i) / tau), 2); below 2 the factor is kept as it is (the reference never
    goes there). 'cosine to f': d_i = f + (d - f) (1 + cos(pi i / tau)) / 2, fractional (floor f =
    min(d, 2) or 1)."""
    if decay == "reference":
        return max(math.ceil(d * (1.0 - done) - 1e-9), min(d, 2.0))
    floor = min(d, 2.0) if decay == "cosine to 2" else 1.0
    return floor + (d - floor) * 0.5 * (1.0 + math.cos(math.pi * done))


# ---------------------------------------------------------------------------------------------
# Per-call plan and the patches that read it


@dataclass(frozen=True)
class ConvSetting:
    dilation: float
    disperse: bool


_PLAN: contextvars.ContextVar[Mapping[str, ConvSetting] | None] = contextvars.ContextVar("ultrares_scalecrafter_plan", default=None)

# transformer_options key of the noise-damped pass (set by NoiseDampedCFG, read by Redilation)
DAMPED_PASS = "ultrares.scalecrafter.damped_pass"


@dataclass(frozen=True)
class DampedPass:
    window: object  # patches.schedule window (StepWindow / SigmaWindow) of the noise-damped range
    undilated: bool  # the paper's base: the plain model instead of the milder table


@dataclass
class Redilation:
    """APPLY_MODEL wrapper: decides which convs run dilated in this UNet call. Tables are either
    fixed (a preset) or derived from the latent of the call (`native` latent size set: auto)."""

    sites: tuple[ConvSite, ...]
    levels: int
    window: object  # patches.schedule window (StepWindow / SigmaWindow) of the dilation range
    disperse_window: object
    progressive: bool | None  # None: progressive when the auto table reaches 3 (as the reference)
    main: Table | None = None  # preset tables (None: auto)
    damped: Table | None = None
    disperse: frozenset = frozenset()
    native: int = 0  # auto mode: the model's native latent side
    ratio: float = 0.0  # auto mode with a fixed deepest-level dilation instead of the measured ratio
    preset: str = ""  # the preset's name ("" = auto)
    ndcfg: bool = True  # whether the reference pairs these tables with noise-damped guidance
    decay: str = "reference"  # progressive decay shape (DECAYS)
    _auto: dict = field(default_factory=dict, repr=False)

    def tables(self, size) -> tuple[Table, Table, frozenset]:
        if self.main is not None:
            return self.main, self.damped, self.disperse
        ratio = self.ratio or max(size) / self.native
        key = round(ratio, 6)
        if key not in self._auto:
            main = auto_table(self.levels, ratio)
            self._auto[key] = (main, milder_table(main, self.levels), top_slots(main))
        return self._auto[key]

    def plan(self, size, sigma: float, transformer_options: Mapping) -> dict[str, ConvSetting] | None:
        damped_pass = transformer_options.get(DAMPED_PASS)
        main, damped, disperse = self.tables(size)
        schedule = transformer_options.get("sample_sigmas")
        if not main and damped_pass is None and is_first_step(transformer_options, sigma):
            ratio = self.ratio or max(size) / self.native
            logging.info("Re-dilate Model: a factor of %g (the %dx%d latent over the model's native %d latent px) leaves every "
                         "convolution as it is, so re-dilation changes nothing here.", ratio, size[-1], size[-2], self.native)
        window, chosen = (self.window, main) if damped_pass is None else (damped_pass.window, damped)
        if damped_pass is not None and damped_pass.undilated or not window.contains(sigma, schedule):
            return None
        progressive = self.progressive if self.progressive is not None else max(main.values(), default=0) >= 3
        done = window.progress(sigma, schedule) if progressive else 0.0
        dispersing = self.disperse_window.contains(sigma, schedule)
        plan = {}
        for site in self.sites:
            d = chosen.get(site.slot, 1.0)
            if d > 1.0:
                d = progressive_dilation(d, done, self.decay) if progressive else d
                if d > 1.0:  # a cosine fade to 1 ends undilated
                    plan[site.path] = ConvSetting(d, dispersing and site.slot in disperse)
        return plan

    def __call__(self, executor, x, t, *args, **kwargs):
        transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        token = _PLAN.set(self.plan(x.shape[-2:], float(t.reshape(-1)[0]), transformer_options))
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            _PLAN.reset(token)


class RedilatedConv:
    """Object patch for one conv's `forward`. Outside a plan it calls the forward it replaced;
    inside, it runs the re-dilation operator with the weights `weights(conv, x)` returns (ComfyUI's
    cast weights, so fp16/bf16, lowvram offloading and LoRA weight functions keep working)."""

    def __init__(self, conv: torch.nn.Conv2d, path: str, previous: Callable, weights: Callable):
        self.conv, self.path, self.previous, self.weights = conv, path, previous, weights

    def __call__(self, x, *args, **kwargs):
        plan = _PLAN.get()
        setting = plan.get(self.path) if plan else None
        if setting is None:
            return self.previous(x, *args, **kwargs)
        conv = self.conv
        weight, bias, release = self.weights(conv, x)
        try:
            dilation = setting.dilation
            if setting.disperse:
                weight, dilation = disperse_kernel(weight), dilation / 2
            return redilated_conv(x, weight, bias, conv.stride, conv.groups, dilation, conv_output_size(conv, x.shape[-2:]))
        finally:
            release()


@dataclass
class NoiseDampedCFG:
    """sampler_pre_cfg_function: within `window`, one extra UNet pass on the unconditional batch in
    the noise-damped state gives u_B; the predictions handed to CFG become (u_B + c - u, u_B), so
    any CFG rule u' + w (c' - u') yields u_B + w (c - u), the reference's combination (affine with
    weights summing to one, so it holds for denoised outputs as for eps)."""

    window: object
    undilated: bool
    calc_cond_batch: Callable  # comfy.samplers.calc_cond_batch

    def __call__(self, args):
        out = args["conds_out"]
        uncond = args["conds"][1] if len(args["conds"]) > 1 else None
        sigma = args["sigma"]
        schedule = args["model_options"].get("transformer_options", {}).get("sample_sigmas")
        if uncond is None or out[1] is None or not self.window.contains(float(sigma.reshape(-1)[0]), schedule):
            return out
        options = dict(args["model_options"])
        options["transformer_options"] = dict(options.get("transformer_options", {}))
        options["transformer_options"][DAMPED_PASS] = DampedPass(self.window, self.undilated)
        damped_uncond = self.calc_cond_batch(args["model"], [None, uncond], args["input"], sigma, options)[1]
        return [damped_uncond + out[0] - out[1], damped_uncond] + list(out[2:])
