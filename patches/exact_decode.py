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
- the attention blocks (global) run exactly as well: q, k, v are computed tile by tile, then each block
  of queries meets all keys in chunks with an online softmax (flash-attention style), so no
  whole-image tensor is needed on the compute device either.
Between layers only the block input and output tensors live ("states", plus q/k/v around an
attention block). A Placement says where: states on the state device (host RAM when the compute
device is a GPU), only tiles with their halo and key/value chunks on the compute device, so device
memory is bounded by the tile size whatever the image size."""

import math
from dataclasses import dataclass
from typing import Callable

import torch


class UnsupportedDecoder(ValueError):
    """The module is not the AutoencoderKL decoder this decode reproduces exactly."""


@dataclass(frozen=True)
class Placement:
    """Where tiles are computed and where the whole-image layer tensors wait between layers. Every
    tensor that crosses between the two goes through these methods."""
    compute: torch.device
    state: torch.device

    def state_empty(self, shape, dtype) -> torch.Tensor:
        if self.state.type == "cpu" and self.compute.type == "cuda":  # pinned: faster tile transfers
            try:
                return torch.empty(shape, dtype=dtype, pin_memory=True)
            except RuntimeError:  # pinning refused (limits): pageable memory works too
                pass
        return torch.empty(shape, dtype=dtype, device=self.state)

    def to_state(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.state)

    def to_compute(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.compute)


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

    def __init__(self, tile: int, channels: int, placement: Placement, on_tile: Callable[[], None] | None = None,
                 counting: bool = False):
        self.tile, self.channels = tile, channels
        self.budget = tile * tile * channels  # values in one tile's working set
        self.placement = placement
        self.on_tile, self.counting = on_tile, counting
        self.tiles = 0
        self.state_bytes = 0  # peak of the layer tensors alive at once (state device)
        self.tile_bytes = 0  # peak of one tile's working set (compute device)

    @staticmethod
    def _tiles(size, edge):
        for y in range(0, size[0], edge):
            for x in range(0, size[1], edge):
                yield Region(y, min(y + edge, size[0]), x, min(x + edge, size[1]))

    def _tick(self):
        if self.on_tile is not None:
            self.on_tile()

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

        out = src if in_place else self.placement.state_empty(out_shape, src.dtype) if store else None
        stats = ChannelStats()
        previous, current, band_rows = [], [], None  # in place: outputs of the last two bands, not yet written
        for r in self._tiles(out_size, edge):
            if in_place and r.y0 != band_rows:  # a new band starts: the band before the previous one is read no more
                self._write(out, previous)
                previous, current, band_rows = current, [], r.y0
            y = self._tile(src, r, prefix, main, shortcut, size, mid_size)
            stats.add(y)
            if in_place:
                current.append((r, self.placement.to_state(y)))
            elif store:
                out[..., r.y0:r.y1, r.x0:r.x1] = self.placement.to_state(y)
            self._tick()
        self._write(out, previous + current)
        return out, stats

    def _tile(self, src, r: Region, prefix, main, shortcut, size, mid_size):
        main_need = _needed(main, r, mid_size)
        mid_need = main_need if shortcut is None else _union(main_need, shortcut.need(r, mid_size))
        src_need = _needed(prefix, mid_need, size)
        x = self.placement.to_compute(src[..., src_need.y0:src_need.y1, src_need.x0:src_need.x1])
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

    def attention(self, block, x: torch.Tensor, stats: ChannelStats):
        """AttnBlock: x + proj_out(softmax(q k^T / sqrt(C)) v) with q, k, v the 1x1 convolutions of norm(x).
        q, k, v become states, tile by tile; then each band of query rows meets every band of key/value rows
        on the compute device, in sub-blocks, with a running max and sum (online softmax). Scores and sums are
        float32, as fused attention kernels keep them, so the result is the full attention's up to rounding."""
        _require(block, "norm", "q", "k", "v", "proj_out")
        norm = Pointwise(block.norm, stats)
        q, k, v = (self.map(x, [norm, Conv(getattr(block, name))])[0] for name in ("q", "k", "v"))
        b, c, h, w = x.shape
        rows = max(1, min(h, self.budget // (c * w)))  # a query band and a key/value band: one tile's values
        n = rows * w
        n_k = max(1, min(2048, n // 4))  # score sub-blocks of budget / 2 values
        n_q = max(1, min(n, self.budget // 2 // n_k))
        elt = _bytes((), x.dtype)
        self.state_bytes = max(self.state_bytes, 5 * _bytes(x.shape, x.dtype))  # x, q, k, v, output
        self.tile_bytes = max(self.tile_bytes, b * (n * c * (4 * elt + 4) + 2 * n * c * elt + n_q * n_k * 8
                                                    + (n_q + n_k) * c * 4 + 2 * n_q * c * 4))
        bands = [(y0, min(y0 + rows, h)) for y0 in range(0, h, rows)]
        if self.counting:
            self.tiles += len(bands)
            return x, None

        out = self.placement.state_empty(x.shape, x.dtype)
        out_stats = ChannelStats()
        for y0, y1 in bands:
            query = self._tokens(q, y0, y1)
            top = torch.full(query.shape[:2], -math.inf, device=query.device)  # running max of the scores
            total = torch.zeros(query.shape[:2], device=query.device)  # running sum of exp(score - top)
            acc = torch.zeros(query.shape, device=query.device)  # running sum of exp(score - top) * value
            for k0, k1 in bands:
                key, value = self._tokens(k, k0, k1), self._tokens(v, k0, k1)
                for i in range(0, query.shape[1], n_q):
                    qi = query[:, i:i + n_q].float() * c ** -0.5
                    for j in range(0, key.shape[1], n_k):
                        s = torch.bmm(qi, key[:, j:j + n_k].float().transpose(1, 2))
                        new_top = torch.maximum(top[:, i:i + n_q], s.amax(dim=2))
                        s = s.sub_(new_top[..., None]).exp_()
                        fade = (top[:, i:i + n_q] - new_top).exp_()
                        total[:, i:i + n_q].mul_(fade).add_(s.sum(dim=2))
                        acc[:, i:i + n_q].mul_(fade[..., None]).add_(torch.bmm(s, value[:, j:j + n_k].float()))
                        top[:, i:i + n_q] = new_top
            attended = (acc / total[..., None]).to(x.dtype).transpose(1, 2).reshape(b, c, y1 - y0, w)
            y = block.proj_out(attended) + self.placement.to_compute(x[..., y0:y1, :])
            out_stats.add(y)
            out[..., y0:y1, :] = self.placement.to_state(y)
            self._tick()
        return out, out_stats

    def _tokens(self, t, y0, y1):
        """Rows y0:y1 of a state [B, C, H, W] on the compute device as tokens [B, (y1 - y0) * W, C]."""
        return self.placement.to_compute(t[..., y0:y1, :]).flatten(2).transpose(1, 2)


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
    x, stats = run.attention(decoder.mid.attn_1, x, stats)
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
                x, stats = run.attention(up.attn[i], x, stats)
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
    state_bytes: int  # peak bytes of the layer tensors alive at once (state device; grows with the image)
    tile_bytes: int  # peak bytes of one tile's working set (compute device; set by the tile size alone)


def plan(decoder, latent_shape, tile: int, dtype=torch.float32) -> Plan:
    """What exact_decode of one latent of `latent_shape` (decoder input) will do, without computing it."""
    meta = torch.device("meta")
    run = Runner(tile, decoder.conv_out.in_channels, Placement(meta, meta), counting=True)
    _walk(run, decoder, torch.empty(latent_shape, device="meta", dtype=dtype))
    return Plan(run.tiles, run.state_bytes, run.tile_bytes)


@torch.no_grad()
def exact_decode(decoder, z: torch.Tensor, tile: int = 512, placement: Placement | None = None,
                 on_tile: Callable[[], None] | None = None) -> torch.Tensor:
    """decoder(z), computed tile by tile. z: [B, C, h, w] decoder input (after any post-quant conv), in
    the decoder's dtype. `tile`: tile edge in output pixels (the budget of every tile). `placement`: where
    tiles compute and layer tensors wait (default: both on z's device). Returns [B, out_ch, H, W] on the
    state device."""
    if z.ndim != 4:
        raise UnsupportedDecoder(f"latent with {z.ndim} dimensions (only images [B, C, h, w])")
    placement = placement or Placement(z.device, z.device)
    run = Runner(tile, decoder.conv_out.in_channels, placement, on_tile)
    return _walk(run, decoder, placement.to_state(z))
