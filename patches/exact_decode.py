"""Exact tiled decode for the AutoencoderKL decoder (SD1.x/2.x, SDXL, SD3 and FLUX VAEs): the result is
the full decode's, up to floating-point summation order, with bounded working memory.

Why plain tiling is not exact: the decoder's GroupNorms normalise with statistics of the whole tensor,
and the middle attention block mixes every latent position. So the decoder is run layer by layer
(URAE's patch-wise convolution idea, extended to the norms):
- every convolution, nearest upsampling, SiLU and residual sum is evaluated tile by tile, each tile read
  with exactly the halo its layers need (conv k: k // 2 pixels; the zero padding of the full tensor is
  reproduced at the image border and nothing else), so tile results equal the full tensor's pixels;
- every GroupNorm uses per-channel statistics of the whole tensor, accumulated tile by tile (float64
  Chan merge) while the tensor it normalises is written, or in a stats-only pass over the tiles;
- the attention blocks (global) run on the whole tensor, at latent resolution.
Between layers only the block input and output tensors live ("states"); they can sit on another
device (CPU RAM) than the tiles being computed."""

import math
from dataclasses import dataclass
from typing import Callable

import torch


class UnsupportedDecoder(ValueError):
    """The module is not the AutoencoderKL decoder this decode reproduces exactly."""


class ChannelStats:
    """Running per-channel count/mean/M2 over the spatial positions of a [B, C, H, W] tensor."""

    def __init__(self):
        self.count = 0
        self.mean = None
        self.m2 = None

    def add(self, t: torch.Tensor) -> None:
        x = t.float()
        n = x.shape[2] * x.shape[3]
        mean = x.mean(dim=(2, 3))
        m2 = (x - mean[..., None, None]).square().sum(dim=(2, 3))
        mean, m2 = mean.double(), m2.double()
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def group_norm(self, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-(batch, group) mean and 1/sqrt(var + eps), float32, [B, G] (biased variance, as GroupNorm)."""
        b, c = self.mean.shape
        mean = self.mean.reshape(b, groups, c // groups)
        m2 = self.m2.reshape(b, groups, c // groups)
        group_mean = mean.mean(dim=2)
        group_m2 = m2.sum(dim=2) + (mean - group_mean[..., None]).square().sum(dim=2) * self.count
        var = group_m2 / (self.count * (c // groups))
        return group_mean.float(), (var + eps).rsqrt().float()


# ---- local layers: what region of the input an output region needs, and how to compute it ----------

@dataclass(frozen=True)
class Region:
    y0: int
    y1: int
    x0: int
    x1: int

    def crop(self, t: torch.Tensor, inner: "Region") -> torch.Tensor:
        """The part `inner` of tensor `t` that covers self."""
        return t[..., inner.y0 - self.y0:inner.y1 - self.y0, inner.x0 - self.x0:inner.x1 - self.x0]


class Conv:
    """A stride-1 'same' convolution module, run as is: its own zero padding is right at the image border,
    and the ring it spoils at interior tile sides is cropped."""

    def __init__(self, module):
        if not isinstance(module, torch.nn.Conv2d):
            raise UnsupportedDecoder(f"{type(module).__name__} is not a 2D convolution")
        k, p = module.kernel_size, module.padding
        if (tuple(module.stride) != (1, 1) or tuple(module.dilation) != (1, 1) or isinstance(p, str)
                or k[0] != k[1] or p[0] != p[1] or k[0] != 2 * p[0] + 1 or module.padding_mode != "zeros"):
            raise UnsupportedDecoder(f"convolution {module} is not a stride-1, zero-padded 'same' convolution")
        self.module, self.pad = module, p[0]

    def out_size(self, size):
        return size

    def need(self, r: Region, size) -> Region:
        p = self.pad
        return Region(max(0, r.y0 - p), min(size[0], r.y1 + p), max(0, r.x0 - p), min(size[1], r.x1 + p))

    def apply(self, t, r: Region, size):
        p = self.pad
        valid = Region(r.y0 + p * (r.y0 > 0), r.y1 - p * (r.y1 < size[0]), r.x0 + p * (r.x0 > 0), r.x1 - p * (r.x1 < size[1]))
        return r.crop(self.module(t), valid), valid


class Upsample:
    """Nearest x2 upsampling followed by an optional 'same' convolution (comfy's Upsample module)."""

    def __init__(self, module):
        if module.scale_factor not in (2, 2.0):
            raise UnsupportedDecoder(f"upsampling by {module.scale_factor} (only x2 is supported)")
        self.module = module
        self.pad = Conv(module.conv).pad if module.with_conv else 0

    def out_size(self, size):
        return (2 * size[0], 2 * size[1])

    def need(self, r: Region, size) -> Region:
        p = self.pad
        return Region(max(0, (r.y0 - p) // 2), min(size[0], -(-(r.y1 + p) // 2)), max(0, (r.x0 - p) // 2), min(size[1], -(-(r.x1 + p) // 2)))

    def apply(self, t, r: Region, size):
        p = self.pad
        up = Region(2 * r.y0, 2 * r.y1, 2 * r.x0, 2 * r.x1)
        valid = Region(up.y0 + p * (r.y0 > 0), up.y1 - p * (r.y1 < size[0]), up.x0 + p * (r.x0 > 0), up.x1 - p * (r.x1 < size[1]))
        return up.crop(self.module(t), valid), valid


class Pointwise:
    """GroupNorm with whole-tensor statistics, and/or SiLU."""

    def __init__(self, norm=None, stats: ChannelStats | None = None, silu: bool = False):
        if norm is not None:
            if not isinstance(norm, torch.nn.GroupNorm):
                raise UnsupportedDecoder(f"{type(norm).__name__} is not a GroupNorm")
            if stats is not None:  # None only while counting tiles
                self.mean, self.rstd = stats.group_norm(norm.num_groups, norm.eps)
        self.norm, self.silu = norm, silu

    def out_size(self, size):
        return size

    def need(self, r: Region, size) -> Region:
        return r

    def apply(self, t, r: Region, size):
        if self.norm is not None:
            b, c, h, w = t.shape
            g = self.norm.num_groups
            x = (t.float().reshape(b, g, -1) - self.mean.to(t.device)[..., None]) * self.rstd.to(t.device)[..., None]
            x = x.reshape(b, c, h, w)
            if self.norm.weight is not None:
                x = x * self.norm.weight.to(x)[:, None, None] + self.norm.bias.to(x)[:, None, None]
            t = x.to(t.dtype)
        if self.silu:
            t = torch.nn.functional.silu(t)
        return t, r


def _run_chain(ops, t, r: Region, size):
    for op in ops:
        t, r = op.apply(t, r, size)
        size = op.out_size(size)
    return t, r


def _size_after(ops, size):
    for op in ops:
        size = op.out_size(size)
    return tuple(size)


def _needed(ops, r: Region, size) -> Region:
    """The input region of a chain that its output region `r` depends on."""
    sizes = [tuple(size)]
    for op in ops:
        sizes.append(op.out_size(sizes[-1]))
    for op, s in zip(reversed(ops), reversed(sizes[:-1])):
        r = op.need(r, s)
    return r


def _union(a: Region, b: Region) -> Region:
    return Region(min(a.y0, b.y0), max(a.y1, b.y1), min(a.x0, b.x0), max(a.x1, b.x1))


def _out_channels(ops, channels):
    for op in ops:
        if isinstance(op, Conv):
            channels = op.module.out_channels
        elif isinstance(op, Upsample) and op.module.with_conv:
            channels = op.module.conv.out_channels
    return channels


def _bytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


# ---- the layer-by-layer runner ------------------------------------------------------------------------

class Runner:
    """Evaluates local layer chains tile by tile from a stored layer tensor into a new one (or into itself).
    Every chain gets the same working-set budget, tile^2 x `channels` values: `tile` is the tile edge for
    chains `channels` wide (the decoder's output resolution), wider chains get proportionally smaller areas.
    `counting=True` computes nothing and only tallies tiles and memory (for progress and estimates)."""

    def __init__(self, tile: int, channels: int, device, storage_device, on_tile: Callable[[], None] | None = None, counting: bool = False):
        self.tile, self.channels = tile, channels
        self.device, self.storage = device, storage_device
        self.on_tile, self.counting = on_tile, counting
        self.tiles = 0
        self.state_bytes = 0  # peak of the layer tensors alive at once
        self.tile_bytes = 0  # rough peak of one tile's working set

    @staticmethod
    def _tiles(size, edge):
        for y in range(0, size[0], edge):
            for x in range(0, size[1], edge):
                yield Region(y, min(y + edge, size[0]), x, min(x + edge, size[1]))

    def map(self, src: torch.Tensor, main, prefix=(), shortcut=None, store: bool = True, in_place: bool = False):
        """out = main(prefix(src)) [+ shortcut(prefix(src))], tile by tile (`prefix`: layers recomputed per tile
        instead of stored). Written into a new tensor, or with `in_place` into src itself: each band of tile rows
        is written once the next band, the last one reading those rows, is done. Returns the output (None
        unless `store`) and its per-channel statistics."""
        size = tuple(src.shape[-2:])
        mid_size = _size_after(prefix, size)
        out_size = _size_after(main, mid_size)
        channels = _out_channels(list(prefix) + list(main), src.shape[1])
        out_shape = (src.shape[0], channels) + out_size
        in_place = in_place and store and out_shape == tuple(src.shape)
        widest = max([src.shape[1], channels] + [op.module.out_channels for op in list(prefix) + list(main) if isinstance(op, Conv)])
        edge = min(max(8, int(self.tile * math.sqrt(self.channels / widest))), max(out_size))
        band = _bytes((src.shape[0], channels, edge, out_size[1]), src.dtype)
        extra = 2 * band if in_place else _bytes(out_shape, src.dtype) if store else 0
        self.state_bytes = max(self.state_bytes, _bytes(src.shape, src.dtype) + extra)
        self.tile_bytes = max(self.tile_bytes, 8 * widest * (edge + 8) ** 2 * 4)
        if self.counting:
            self.tiles += sum(1 for _ in self._tiles(out_size, edge))
            return (torch.empty(out_shape, device="meta", dtype=src.dtype) if store else None), None

        out = src if in_place else torch.empty(out_shape, device=self.storage, dtype=src.dtype) if store else None
        stats = ChannelStats()
        previous, current, band_rows = [], [], None  # in place: outputs of the last two bands, not yet written
        for r in self._tiles(out_size, edge):
            if in_place and r.y0 != band_rows:  # a new band starts: the band before the previous one is read no more
                self._write(out, previous)
                previous, current, band_rows = current, [], r.y0
            y = self._tile(src, r, prefix, main, shortcut, size, mid_size)
            stats.add(y)
            if in_place:
                current.append((r, y.to(self.storage)))
            elif store:
                out[..., r.y0:r.y1, r.x0:r.x1] = y.to(self.storage)
            if self.on_tile is not None:
                self.on_tile()
        self._write(out, previous + current)
        return out, stats

    def _tile(self, src, r: Region, prefix, main, shortcut, size, mid_size):
        main_need = _needed(main, r, mid_size)
        mid_need = main_need if shortcut is None else _union(main_need, shortcut.need(r, mid_size))
        src_need = _needed(prefix, mid_need, size)
        x = src[..., src_need.y0:src_need.y1, src_need.x0:src_need.x1].to(self.device)
        x, valid = _run_chain(prefix, x, src_need, size)
        y, y_valid = _run_chain(main, valid.crop(x, main_need), main_need, mid_size)
        y = y_valid.crop(y, r)
        if shortcut is not None:
            sc_need = shortcut.need(r, mid_size)
            s, s_valid = shortcut.apply(valid.crop(x, sc_need), sc_need, mid_size)
            y = y + s_valid.crop(s, r)
        return y

    @staticmethod
    def _write(out, tiles):
        for r, y in tiles:
            out[..., r.y0:r.y1, r.x0:r.x1] = y

    def whole(self, module, src: torch.Tensor):
        """A global module (attention) on the whole tensor; statistics of its output."""
        self.state_bytes = max(self.state_bytes, 3 * _bytes(src.shape, src.dtype))
        if self.counting:
            self.tiles += 1
            return src, None
        out = module(src.to(self.device))
        stats = ChannelStats()
        stats.add(out)
        if self.on_tile is not None:
            self.on_tile()
        return out.to(self.storage), stats


def _require(module, *names):
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise UnsupportedDecoder(f"{type(module).__name__} has no {', '.join(missing)}: not an AutoencoderKL decoder")


def _resnet(run: Runner, block, x, stats, prefix=()):
    """ResnetBlock on prefix(x): shortcut + conv2(silu(norm2(conv1(silu(norm1(.)))))); a statistics pass for
    norm2 (conv1 is recomputed rather than stored), then the output pass, in place when shapes allow."""
    _require(block, "norm1", "conv1", "norm2", "conv2", "in_channels", "out_channels")
    if getattr(block, "temb_proj", None) is not None:
        raise UnsupportedDecoder("ResnetBlock with a time embedding")
    first = [Pointwise(block.norm1, stats, silu=True), Conv(block.conv1)]
    _, mid_stats = run.map(x, first, prefix, store=False)
    second = [Pointwise(block.norm2, mid_stats, silu=True), Conv(block.conv2)]
    if block.in_channels == block.out_channels:
        shortcut = Pointwise()
    else:
        shortcut = Conv(block.conv_shortcut if block.use_conv_shortcut else block.nin_shortcut)
    return run.map(x, first + second, prefix, shortcut, in_place=True)


def _walk(run: Runner, decoder, z):
    _require(decoder, "conv_in", "mid", "up", "norm_out", "conv_out", "num_resolutions", "num_res_blocks")
    x, stats = run.map(z, [Conv(decoder.conv_in)])
    x, stats = _resnet(run, decoder.mid.block_1, x, stats)
    x, stats = run.whole(decoder.mid.attn_1, x)
    x, stats = _resnet(run, decoder.mid.block_2, x, stats)
    prefix = ()
    for level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[level]
        for i in range(decoder.num_res_blocks + 1):
            if prefix:  # statistics of the upsampled tensor that is never stored
                _, stats = run.map(x, prefix, store=False)
            x, stats = _resnet(run, up.block[i], x, stats, prefix)
            prefix = ()
            if len(up.attn) > 0:
                x, stats = run.whole(up.attn[i], x)
        if level == 1:
            # The upsample into the output resolution makes the widest full-size tensor: recompute it inside
            # the next block's passes instead of storing it.
            prefix = [Upsample(up.upsample)]
        elif level != 0:
            x, stats = run.map(x, [Upsample(up.upsample)])
    if getattr(decoder, "give_pre_end", False):
        return x
    x, _ = run.map(x, [Pointwise(decoder.norm_out, stats, silu=True), Conv(decoder.conv_out)])
    return torch.tanh(x) if getattr(decoder, "tanh_out", False) else x


@dataclass(frozen=True)
class Plan:
    tiles: int  # tile evaluations (for a progress bar)
    state_bytes: int  # peak bytes of the layer tensors alive at once (on the storage device)
    tile_bytes: int  # rough peak bytes of one tile's working set (on the compute device)


def plan(decoder, latent_shape, tile: int, dtype=torch.float32) -> Plan:
    """What exact_decode of one latent of `latent_shape` (decoder input) will do, without computing it."""
    run = Runner(tile, decoder.conv_out.in_channels, "meta", "meta", counting=True)
    _walk(run, decoder, torch.empty(latent_shape, device="meta", dtype=dtype))
    return Plan(run.tiles, run.state_bytes, run.tile_bytes)


@torch.no_grad()
def exact_decode(decoder, z: torch.Tensor, tile: int = 512, device=None, storage_device=None,
                 on_tile: Callable[[], None] | None = None) -> torch.Tensor:
    """decoder(z), computed tile by tile. z: [B, C, h, w] decoder input (after any post-quant conv), in
    the decoder's dtype. `tile`: tile edge in output pixels (the budget of every tile). Tiles compute on `device` (default z's);
    the layer tensors are kept on `storage_device` (default: `device`). Returns [B, out_ch, H, W] on
    `storage_device`."""
    if z.ndim != 4:
        raise UnsupportedDecoder(f"latent with {z.ndim} dimensions (only images [B, C, h, w])")
    device = z.device if device is None else device
    storage_device = device if storage_device is None else storage_device
    run = Runner(tile, decoder.conv_out.in_channels, device, storage_device, on_tile)
    return _walk(run, decoder, z.to(storage_device))
