"""CutDiffusion as one APPLY_MODEL wrapper: strided sub-lattice patches (stage 1), overlapping
jittered windows (stage 2) and the optional cross-patch pixel interaction.

Why a wrapper suffices (research note §2.6): the reference denoises N independent base-size latents
and interleaves them into the high-resolution latent at the switch step. That interleave is a fixed
bijection of i.i.d. noise, so sampling the high-resolution latent from the start and, in stage 1,
denoising its N strided sub-lattices as a batch is the same method. Samplers act element-wise, so
any sampler and scheduler works unchanged.

Pure torch; what ComfyUI provides at run time (free memory, cancel, progress bar, the SDXL size
embedder) is passed in.
"""

import hashlib
import logging
import math
import struct
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .schedule import is_first_step

KEY = "ultrares.patch_split"  # wrapper key on the model
INTERACTION_KEY = "ultrares.pixel_interaction"  # transformer_options entry set by Pixel Interaction
SDXL_SIZE_MODES = ("image size + window crop", "window size", "unchanged")
# Stage-2 jitter canvas. The reference zero-pads, so a window shifted into the margin sees a noise-free
# strip (a hard edge at high sigma) that the model draws objects at; mirroring keeps the margin
# statistically like the picture. Measured on the toy world in README. Option -> torch pad mode.
JITTER_PADDINGS = {"reflect": "reflect", "zeros (reference)": "constant"}


# ---------------------------------------------------------------- stage 1: strided sub-lattices

def lattice(size: int, patch: int) -> tuple[int, int]:
    """(stride, padded size) of one latent side: `stride` = ceil(size / patch) sub-lattices, each
    ceil(size / stride) long, so patches are never larger than `patch` and padding stays < stride."""
    stride = max(1, math.ceil(size / patch))
    return stride, stride * math.ceil(size / stride)


def split_lattice(x: torch.Tensor, hs: int, ws: int) -> torch.Tensor:
    """(..., H, W) -> (hs*ws, ..., H/hs, W/ws): patch k = (h, w) row-major is x[..., h::hs, w::ws]."""
    x = x.unflatten(-1, (x.shape[-1] // ws, ws)).unflatten(-3, (x.shape[-2] // hs, hs))  # (..., h, hs, w, ws)
    return x.movedim(-3, 0).movedim(-1, 1).flatten(0, 1)


def merge_lattice(patches: torch.Tensor, hs: int, ws: int) -> torch.Tensor:
    """Inverse of split_lattice: patch k = (h, w) goes back to [..., h::hs, w::ws]."""
    x = patches.unflatten(0, (hs, ws)).movedim(1, -1).movedim(0, -3)  # (..., h, hs, w, ws)
    return x.flatten(-2).flatten(-3, -2)


def step_generator(seed: int, sigma: float) -> torch.Generator:
    """One CPU generator per (seed, sigma): the cond and uncond calls of a step draw the same
    numbers without any cache, and a run is reproducible on every device."""
    digest = hashlib.blake2b(struct.pack("<Qd", seed % 2**64, float(sigma)), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)  # mixed: CPU generators keep only 32 bits


def interaction_permutation(count: int, shape, generator: torch.Generator) -> torch.Tensor:
    """(count, *shape) long: for every element position its own random permutation of the patches;
    entry [n, e] names the patch whose value element e of slot n receives."""
    elements = math.prod(shape)
    perm = torch.rand((elements, count), generator=generator).argsort(dim=1)
    return perm.t().reshape(count, *shape)


def _expand(perm: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Permutation (P, C, h, w) broadcast over the batch dim of patches (P, B, C, h, w)."""
    return perm.to(patches.device).unsqueeze(1).expand_as(patches)


def interact(patches: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """slot n, element e <- patch perm[n, e], element e (patches: (P, B, C, h, w))."""
    return patches.gather(0, _expand(perm, patches))


def separate(patches: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of interact: every prediction returns to the patch its input came from."""
    return torch.empty_like(patches).scatter_(0, _expand(perm, patches), patches)


# ---------------------------------------------------------------- stage 2: overlapping windows

def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Starts every `stride`, the last one moved back to end at the border (the reference grid)."""
    if size <= window:
        return [0]
    count = math.ceil((size - window) / stride) + 1
    return [min(i * stride, size - window) for i in range(count)]


def jitter_offset(start: int, size: int, window: int, amount: int, generator: torch.Generator) -> int:
    """Random shift of one window side in the reference's ranges: a window at the start border moves
    only into the top/left padding, one at the end border only into the bottom/right padding, inner
    ones both ways; a window spanning the whole side never moves."""
    at_start, at_end = start == 0, start + window >= size
    if amount == 0 or (at_start and at_end):
        return 0
    low, high = (-amount, 0) if at_start else (0, amount) if at_end else (-amount, amount)
    return int(torch.randint(low, high + 1, (1,), generator=generator))


@dataclass(frozen=True)
class Windows:
    """Stage-2 layout: window size, canvas padding (= jitter amount) and the windows' top-left
    corners on the padded canvas."""

    size: tuple[int, int]
    pad: tuple[int, int]
    corners: list[tuple[int, int]]


def windows(height: int, width: int, patch: int, overlap: float, jitter: bool, generator: torch.Generator) -> Windows:
    wh, ww = min(patch, height), min(patch, width)
    sh, sw = max(1, round(wh * (1 - overlap))), max(1, round(ww * (1 - overlap)))
    # Reference: jitter (window - stride) / 4 on a canvas zero-padded by as much on every side.
    jh = (wh - sh) // 4 if jitter and height > wh else 0
    jw = (ww - sw) // 4 if jitter and width > ww else 0
    corners = []
    for y in window_starts(height, wh, sh):
        for x in window_starts(width, ww, sw):
            corners.append((jh + y + jitter_offset(y, height, wh, jh, generator),
                            jw + x + jitter_offset(x, width, ww, jw, generator)))
    return Windows((wh, ww), (jh, jw), corners)


def blend_weight(height: int, width: int, mode: str) -> torch.Tensor:
    """(height, width) weight of one window: 'uniform' (reference) or 'smooth' (a Hann taper that
    fades towards the window edges, never exactly zero, so every covered pixel keeps a weight)."""
    if mode == "uniform":
        return torch.ones(height, width)

    def hann(n):
        return torch.sin(math.pi * (torch.arange(n) + 0.5) / n) ** 2

    return hann(height)[:, None] * hann(width)[None, :]


# ---------------------------------------------------------------- the wrapper

@dataclass(frozen=True)
class PixelInteraction:
    """Settings Pixel Interaction leaves in transformer_options for the Patch Split wrapper."""

    seed: int


@dataclass(frozen=True)
class StageSwitch:
    """Stage 1 runs while sigma > the switch sigma. unit 'steps': `value` is the fraction of this
    sampling's steps (the reference: first half); unit 'sigma': `value` is the switch sigma."""

    unit: str
    value: float

    def sigma(self, transformer_options: dict, model_sampling) -> float:
        if self.unit == "sigma":
            return self.value
        schedule = transformer_options.get("sample_sigmas")
        if schedule is None:  # called outside a sampler: read the fraction as a timestep percent
            return float(model_sampling.percent_to_sigma(self.value))
        steps = len(schedule) - 1
        return float(schedule[min(steps, max(0, round(self.value * steps)))])


def _no_progress(total: int) -> Callable[[int], None]:
    return lambda done: None


@dataclass(frozen=True)
class Runtime:
    """What the host provides: free memory of a device, cancel check, a progress bar factory."""

    free_memory: Callable[[torch.device], float] = lambda device: float("inf")
    check_interrupt: Callable[[], None] = lambda: None
    progress: Callable[[int], Callable[[int], None]] = _no_progress


class UnsupportedInput(ValueError):
    """Something in the sampling that Patch Split cannot tile (the message says what to change)."""


@dataclass(frozen=True)
class PatchSplit:
    """The APPLY_MODEL wrapper. patch: base size in latent px; max_batch: patches/windows per model
    call (0 = as many as free memory allows); sdxl_embedder: SDXL's size embedder, or None when the
    model has no SDXL size conditioning."""

    patch: int
    switch: StageSwitch
    overlap: float = 0.5
    jitter: bool = True
    blend: str = "uniform"
    max_batch: int = 0
    seed: int = 0
    sdxl_size: str = SDXL_SIZE_MODES[0]
    padding: str = "reflect"  # a JITTER_PADDINGS option
    sdxl_embedder: Optional[Callable] = None
    runtime: Runtime = field(default_factory=Runtime)
    name: str = "Patch Split/Reassemble"

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        height, width = x.shape[-2:]
        if height <= self.patch and width <= self.patch:
            if is_first_step(transformer_options, float(t.max())):
                logging.info("%s: the %dx%d latent fits one %d latent px patch, so the model runs unchanged (use a smaller "
                             "patch_size or a larger latent to split it).", self.name, width, height, self.patch)
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if control is not None:
            raise UnsupportedInput(f"{self.name}: a ControlNet is applied, and its features are computed for the whole "
                                   "latent, not per patch. Fix: apply the ControlNet in a pass without Patch Split "
                                   "(for example a low-resolution pass), or remove it from this sampling.")
        conds = dict(kwargs, c_concat=c_concat, c_crossattn=c_crossattn)
        call = _ModelCall(self, executor, x, t, conds, transformer_options)
        sigma = float(t.max())
        model_sampling = executor.class_obj.model_sampling
        if sigma > self.switch.sigma(transformer_options, model_sampling):
            return self._stage1(call, sigma, transformer_options.get(INTERACTION_KEY))
        return self._stage2(call, sigma)

    def _stage1(self, call: "_ModelCall", sigma: float, interaction: Optional[PixelInteraction]) -> torch.Tensor:
        x = call.x
        height, width = x.shape[-2:]
        (hs, ph), (ws, pw) = lattice(height, self.patch), lattice(width, self.patch)

        def split(tensor):
            if (ph, pw) != (height, width):
                tensor = F.pad(tensor, (0, pw - width, 0, ph - height), mode="reflect")
            return split_lattice(tensor, hs, ws)

        patches = split(x)
        perm = None
        if interaction is not None and len(patches) > 1:
            perm = interaction_permutation(len(patches), patches.shape[2:], step_generator(interaction.seed, sigma))
            patches = interact(patches, perm)
        spatial = {k: split(v) for k, v in call.spatial.items()}
        size_cond = self._size_cond(call, [(0, 0)] * len(patches), patches.shape[-2:])
        out = []
        call.run(len(patches), patches.shape[2:], lambda i, j: (patches[i:j], {k: v[i:j] for k, v in spatial.items()} | size_cond(i, j)),
                 lambda i, j, pred: out.append(pred))
        out = torch.cat(out)
        if perm is not None:
            out = separate(out, perm)
        return merge_lattice(out, hs, ws)[..., :height, :width]

    def _stage2(self, call: "_ModelCall", sigma: float) -> torch.Tensor:
        x = call.x
        height, width = x.shape[-2:]
        layout = windows(height, width, self.patch, self.overlap, self.jitter, step_generator(self.seed, sigma))
        (wh, ww), (jh, jw) = layout.size, layout.pad

        mode = JITTER_PADDINGS[self.padding]

        def canvas(tensor):  # jitter <= (window - 1) / 4 < side, as reflect padding needs
            return F.pad(tensor, (jw, jw, jh, jh), mode=mode) if jh or jw else tensor

        def crops(tensor, i, j):
            return torch.stack([tensor[..., y:y + wh, x:x + ww] for y, x in layout.corners[i:j]])

        padded = canvas(x)
        spatial = {k: canvas(v) for k, v in call.spatial.items()}
        # SDXL crop = the window's start on the padded canvas, as the reference sends it (+8 * pad px)
        size_cond = self._size_cond(call, layout.corners, (wh, ww))
        weight = blend_weight(wh, ww, self.blend).to(padded)
        uniform = self.blend == "uniform"
        value, count = None, torch.zeros(padded.shape[-2:], dtype=padded.dtype, device=padded.device)

        def accumulate(i, j, pred):
            nonlocal value
            if value is None:
                value = torch.zeros(pred.shape[1:-2] + padded.shape[-2:], dtype=pred.dtype, device=pred.device)
            for (y, x), p in zip(layout.corners[i:j], pred):
                value[..., y:y + wh, x:x + ww] += p if uniform else p * weight
                count[y:y + wh, x:x + ww] += weight

        call.run(len(layout.corners), (x.shape[1], wh, ww), lambda i, j: (crops(padded, i, j), {k: crops(v, i, j) for k, v in spatial.items()} | size_cond(i, j)),
                 accumulate)
        return (value / count)[..., jh:jh + height, jw:jw + width]

    def _size_cond(self, call: "_ModelCall", origins, item_size):
        """Per item SDXL adm vectors ('y'): the size/crop embedding redone for each patch or window."""
        y = call.batched.get("y")
        if self.sdxl_embedder is None or y is None or self.sdxl_size == "unchanged":
            return lambda i, j: {}
        height, width = call.x.shape[-2:]
        if self.sdxl_size == "window size":
            size, origins = [8 * s for s in item_size], [(0, 0)] * len(origins)
        else:
            size = [8 * height, 8 * width]
        base = y.clone()
        dim = y.shape[-1]
        embed = lambda values: self.sdxl_embedder(torch.tensor(values, dtype=torch.float32)).flatten().to(y)
        base[..., dim - 1536:dim - 1024] = embed(size)  # original size
        base[..., dim - 512:] = embed(size)  # target size

        def items(i, j):
            out = base.unsqueeze(0).repeat(j - i, *([1] * y.ndim))
            for n, (cy, cx) in enumerate(origins[i:j]):
                out[n, ..., dim - 1024:dim - 512] = embed([8 * cy, 8 * cx])
            return {"y": out}

        return items


class _ModelCall:
    """One apply_model call being tiled: sorts its conditioning into spatial (cut like the latent),
    batch-aligned (repeated per item) and the rest (passed as is), and runs items in groups.

    Items are batched as [chunk][item][sample], so every cond/uncond chunk of `cond_or_uncond`
    stays contiguous and patches that split the batch by chunk keep working."""

    def __init__(self, wrapper: PatchSplit, executor, x, t, conds: dict, transformer_options: dict):
        self.wrapper, self.executor, self.x, self.t, self.options = wrapper, executor, x, t, transformer_options
        batch = x.shape[0]
        self.chunks = len(transformer_options.get("cond_or_uncond", [])) or 1
        if batch % self.chunks:
            self.chunks = 1
        self.spatial, self.batched, self.other = {}, {}, {}
        for name, value in conds.items():
            if torch.is_tensor(value) and value.ndim == x.ndim and value.shape[0] == batch and value.shape[-2:] == x.shape[-2:]:
                self.spatial[name] = value
            elif _is_batched(value, batch):
                self.batched[name] = value
            else:
                self.other[name] = value

    def _to_batch(self, items: torch.Tensor) -> torch.Tensor:
        """(k, B, ...) -> (k*B, ...) in [chunk][item][sample] order."""
        k, batch = items.shape[:2]
        return items.unflatten(1, (self.chunks, batch // self.chunks)).transpose(0, 1).flatten(0, 2)

    def _from_batch(self, out: torch.Tensor, k: int) -> torch.Tensor:
        return out.unflatten(0, (self.chunks, k, -1)).transpose(0, 1).flatten(1, 2)

    def _repeat(self, value, k: int):
        if isinstance(value, (list, tuple)):
            return type(value)(self._repeat(v, k) for v in value)
        return self._to_batch(value.unsqueeze(0).expand(k, *value.shape))

    def group_size(self, count: int, item_shape) -> int:
        if self.wrapper.max_batch > 0:
            k = min(count, self.wrapper.max_batch)
        else:
            free = self.wrapper.runtime.free_memory(self.x.device)
            model = self.executor.class_obj
            per_item = model.memory_required([self.x.shape[0], *item_shape]) if hasattr(model, "memory_required") else 0
            k = count if per_item <= 0 else int(min(count, max(1, free // (1.5 * per_item))))
        groups = math.ceil(count / k)
        return math.ceil(count / groups)  # equal groups

    def run(self, count: int, item_shape, make_items, consume) -> None:
        """Items of shape (B, *item_shape) in groups: make_items(i, j) -> (latent items (k, B, ...),
        per-item conds (k, B, ...)); consume(i, j, predictions (k, B, ...))."""
        k = self.group_size(count, item_shape)
        starts = range(0, count, k)
        progress = self.wrapper.runtime.progress(len(starts)) if len(starts) > 1 else _no_progress(0)
        for n, i in enumerate(starts):
            self.wrapper.runtime.check_interrupt()
            j = min(count, i + k)
            items, per_item = make_items(i, j)
            conds = {name: self._repeat(v, j - i) for name, v in self.batched.items()}
            conds.update({name: self._to_batch(v) for name, v in per_item.items()})
            conds.update(self.other)
            c_concat, c_crossattn = conds.pop("c_concat", None), conds.pop("c_crossattn", None)
            pred = self.executor(self._to_batch(items), self._repeat(self.t, j - i), c_concat, c_crossattn, None,
                                 self.options, **conds)
            consume(i, j, self._from_batch(pred, j - i))
            progress(n + 1)


def _is_batched(value, batch: int) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(_is_batched(v, batch) for v in value)
    return torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == batch
