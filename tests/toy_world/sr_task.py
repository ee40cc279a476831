"""The toy super-resolution task PASD is trained and measured on: toy scenes rendered at 4x as ground
truth, degraded low-res versions (blur, noise, JPEG-like block quantisation, down-sampling), and the
ControlNet hint made from them as a workflow makes it (the low-res IMAGE scaled bicubically to the
output size). Pictures are at latent resolution in [-1, 1] (the toy VAE: one latent px = 8x8 image px)."""

import math

import torch
import torch.nn.functional as F

from . import scenes

RATIO = 8  # toy VAE: image px per latent px


def ground_truth(batch: int, gen: torch.Generator, scale: int = 4):
    """(pictures at scale x 32 latent px, kinds)."""
    return scenes.sample(batch, gen, scale=scale)


def _blur(x, sigma):
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _dct_matrix(n=8):
    i = torch.arange(n, dtype=torch.float32)
    m = torch.cos(math.pi * (2 * i[None] + 1) * i[:, None] / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


def jpeg_like(x, step: float, block: int = 8):
    """Quantise the 2-D DCT of each block x block tile, coarser for higher frequencies (as JPEG's tables do)."""
    b, c, h, w = x.shape
    ph, pw = (-h) % block, (-w) % block
    x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    d = _dct_matrix(block)
    tiles = x.unfold(2, block, block).unfold(3, block, block)  # b c H W block block
    coef = d @ tiles @ d.T
    i = torch.arange(block, dtype=x.dtype)
    q = step * (1 + (i[:, None] + i[None]) / 2)
    tiles = d.T @ (torch.round(coef / q) * q) @ d
    out = tiles.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h + ph, w + pw)
    return out[:, :, :h, :w]


def degrade(hr: torch.Tensor, gen: torch.Generator, factor: float | None = None) -> torch.Tensor:
    """A low-res version of `hr` (B, 3, H, W): blur, down-sample by `factor` (random in [2, 4] if None),
    noise, JPEG-like quantisation; each picture gets its own random strengths."""
    rand = lambda: float(torch.rand((), generator=gen))
    out = []
    for x in hr.split(1):
        f = factor if factor is not None else 2 + 2 * rand()
        x = _blur(x, 0.4 + 1.6 * rand())
        size = (max(4, round(x.shape[2] / f)), max(4, round(x.shape[3] / f)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        x = x + torch.randn(x.shape, generator=gen) * (0.1 * rand())
        x = jpeg_like(x, 0.02 + 0.12 * rand())
        out.append(x.clamp(-1, 1))
    return out


def to_image(latent_rgb: torch.Tensor) -> torch.Tensor:
    """Latent-resolution picture in [-1, 1] -> the toy VAE's decoded image (B, 3, 8H, 8W) in [0, 1]."""
    return (F.interpolate(latent_rgb, scale_factor=RATIO, mode="nearest") + 1) / 2


def hint(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The ControlNet hint for an output of `size` latent px: the decoded low-res image scaled bicubically
    to size x 8 image px, in [0, 1] (what ImageScale bicubic does to the low-res IMAGE in a workflow)."""
    image = to_image(lr)
    return F.interpolate(image, size=(size[0] * RATIO, size[1] * RATIO), mode="bicubic", align_corners=False).clamp(0, 1)
