"""Synthetic toy-world pictures: exactly one disk, square or triangle (random colour, size and a small
position jitter) on a random linear-gradient background. Values in [-1, 1], shape (B, 3, S, S).
Objects contrast with the background everywhere, so a count of foreground blobs is well defined."""

import math

import torch

SIZE = 32
RADIUS = (6.0, 11.0)  # circumradius in pixels at SIZE
JITTER = 3.0
MIN_CONTRAST = 0.5  # least colour distance (RGB, [-1, 1] scale) between object and background, per pixel


def _signed_distance(kind: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Positive inside the shape; kind 0 disk, 1 square (half side r/sqrt2 ... r*0.8), 2 upright triangle."""
    disk = r - torch.sqrt(dx ** 2 + dy ** 2)
    square = 0.8 * r - torch.maximum(dx.abs(), dy.abs())
    # equilateral triangle of circumradius r: three half-planes at distance r/2 from the centre
    normals = [(0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5)]
    tri = torch.stack([r / 2 - (nx * dx + ny * dy) for nx, ny in normals]).amin(0)
    return torch.where(kind == 0, disk, torch.where(kind == 1, square, tri))


def _grid(size: int):
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    return torch.meshgrid(coords, coords, indexing="ij")


def gradient(bg_a: torch.Tensor, bg_b: torch.Tensor, angle: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """Linear gradient from colour bg_a to bg_b (B, 3) along direction `angle` (B,): (B, 3, size, size)."""
    y, x = _grid(size)
    u = ((x[None] - size / 2) * torch.cos(angle)[:, None, None] + (y[None] - size / 2) * torch.sin(angle)[:, None, None]) / size + 0.5
    return bg_a[:, :, None, None] + (bg_b - bg_a)[:, :, None, None] * u[:, None]


def draw(canvas: torch.Tensor, kind: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Paint one object per picture over `canvas` (B, 3, S, S): kind (B,), centre (B, 2) in px,
    radius (B,), colour (B, 3) in [-1, 1]. Anti-aliased edges."""
    y, x = _grid(canvas.shape[-1])
    dx = x[None] - centre[:, 0, None, None]
    dy = centre[:, 1, None, None] - y[None]  # y up, so the triangle points up
    inside = (_signed_distance(kind[:, None, None], dx, dy, radius[:, None, None]) + 0.5).clamp(0, 1)[:, None]
    return canvas * (1 - inside) + colour[:, :, None, None] * inside


def sample(batch: int, gen: torch.Generator, kinds: torch.Tensor | None = None, scale: float = 1):
    """(pictures, kinds): a batch of random scenes, reproducible from the generator. `scale` renders the
    same scenes (same draws) at scale x SIZE: the ground truth of super-resolution."""
    rand = lambda *shape: torch.rand(*shape, generator=gen)
    kind = torch.randint(0, 3, (batch,), generator=gen) if kinds is None else kinds
    centre = SIZE / 2 + (rand(batch, 2) * 2 - 1) * JITTER
    radius = RADIUS[0] + rand(batch) * (RADIUS[1] - RADIUS[0])
    bg_a, bg_b = rand(batch, 3) * 1.6 - 0.8, rand(batch, 3) * 1.6 - 0.8
    colour = rand(batch, 3) * 2 - 1
    # Redraw colours too close to any background value (the gradient is a segment from bg_a to bg_b).
    for _ in range(50):
        weak = _contrast(colour, bg_a, bg_b) < MIN_CONTRAST
        if not weak.any():
            break
        colour[weak] = rand(int(weak.sum()), 3) * 2 - 1
    weak = _contrast(colour, bg_a, bg_b) < MIN_CONTRAST
    bg_b[weak] = bg_a[weak]  # rare: fall back to a flat background
    colour[weak] = torch.where(bg_a[weak] > 0, -1.0, 1.0)
    angle = rand(batch) * 2 * math.pi
    return draw(gradient(bg_a, bg_b, angle, round(SIZE * scale)), kind, centre * scale, radius * scale, colour), kind


def _contrast(colour, bg_a, bg_b):
    """Least distance from the colour to the segment of background colours."""
    d = bg_b - bg_a
    t = (((colour - bg_a) * d).sum(1) / (d * d).sum(1).clamp_min(1e-8)).clamp(0, 1)
    return (colour - (bg_a + t[:, None] * d)).norm(dim=1)
