"""Read a toy-world picture: how many objects, how large, and whether it is a clean picture at all.

A picture is modelled as what the toy world draws: a linear-gradient background plus flat-coloured
objects. The background plane is fitted robustly (border pixels first, then every pixel that fits);
pixels far from it are foreground, and its 8-connected blobs of at least MIN_AREA latent pixels are
the objects. A repetition figure alone would reward broken output (pure noise reads as one huge
object), so every reading also says how well "gradient + flat objects" explains the picture:
`residual_rms` is what is left after subtracting the plane and each object's median colour, away
from object edges. Clean pictures leave almost nothing; noisy or smeared ones do not.

`scale` is the picture's side over the native side. An object's edge is a soft ramp about one
native pixel wide, so at scale s it is s latent px wide, and the band left out of the residual
grows with it. With a fixed 1-px band (the reader before 2026-12-06, `scale=1` at every size) a
bicubic 4x upscale of clean native pictures read as 0.36 clean against their own 0.91: the reader
measured edge softness, not brokenness (docs/repetition.md, "The reader at 4x").
"""

from dataclasses import dataclass

import numpy as np
import scipy.ndimage

FOREGROUND = 0.25  # RGB distance from the plane ([-1, 1] scale; objects differ by >= scenes.MIN_CONTRAST = 0.5)
MIN_AREA = 16  # latent px: the smallest drawn object (a triangle of radius 6) covers ~47
CLEAN_RESIDUAL = 0.08  # residual_rms above this is not a clean picture
CLEAN_FOREGROUND = 0.6  # ... nor is one that is mostly "object"


@dataclass(frozen=True)
class Reading:
    objects: int
    size_ratio: float  # mean sqrt(object area) / image side; 0 without objects
    foreground: float  # share of pixels off the background plane
    residual_rms: float  # what "gradient + flat objects" leaves unexplained, away from edges

    @property
    def clean(self) -> bool:
        return self.objects >= 1 and self.residual_rms <= CLEAN_RESIDUAL and self.foreground <= CLEAN_FOREGROUND


def _plane_fit(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    y, x = np.mgrid[0:h, 0:w]
    basis = np.stack([np.ones_like(x), x / w, y / h], -1).reshape(-1, 3).astype(np.float64)
    pix = img.reshape(3, -1).T.astype(np.float64)
    sel = mask.reshape(-1)
    coef, *_ = np.linalg.lstsq(basis[sel], pix[sel], rcond=None)
    return (basis @ coef).T.reshape(img.shape)


def read(img: np.ndarray, scale: int = 1) -> Reading:
    """img: (3, H, W) RGB in [-1, 1] at latent resolution (one value per latent pixel), `scale` times the
    native side (the width of the edge band left out of the residual, in latent px)."""
    img = np.asarray(img, dtype=np.float64)
    h, w = img.shape[1:]
    mask = np.zeros((h, w), bool)
    mask[[0, -1], :] = mask[:, [0, -1]] = True
    for _ in range(4):
        plane = _plane_fit(img, mask)
        distance = np.linalg.norm(img - plane, axis=0)
        mask = distance < FOREGROUND
        if mask.sum() < 3:  # nothing looks like background: no plane to speak of
            mask[:] = True
            plane = _plane_fit(img, mask)
            distance = np.linalg.norm(img - plane, axis=0)
            break
    foreground = distance >= FOREGROUND
    labels, n = scipy.ndimage.label(foreground, structure=np.ones((3, 3)))
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = np.flatnonzero(areas >= MIN_AREA) + 1
    model = plane.copy()
    for lab in range(1, n + 1):  # every blob, kept or not, is modelled as flat colour
        sel = labels == lab
        model[:, sel] = np.median(img[:, sel], axis=1, keepdims=True)  # edge pixels are mixed colours
    band = np.ones((2 * scale + 1, 2 * scale + 1))  # `scale` px either side of the boundary
    edges = scipy.ndimage.binary_dilation(foreground, band) & ~scipy.ndimage.binary_erosion(foreground, band)
    interior = ~edges
    residual = np.linalg.norm(img - model, axis=0)[interior] if interior.any() else np.array([1.0])
    size = float(np.mean(np.sqrt(areas[keep - 1])) / max(h, w)) if len(keep) else 0.0
    return Reading(int(len(keep)), size, float(foreground.mean()), float(np.sqrt(np.mean(residual ** 2))))


def read_latents(latents, scale: int = 1) -> list[Reading]:
    """Readings of a batch of toy latents (B, 4, h, w) (torch or numpy), `scale` times the native side."""
    arr = latents.detach().cpu().numpy() if hasattr(latents, "detach") else np.asarray(latents)
    return [read(x[:3], scale) for x in arr]


def read_images(images, ratio: int = 8, scale: int = 1) -> list[Reading]:
    """Readings of decoded IMAGE batches (B, H, W, 3) in [0, 1], at latent resolution (mean of each block)."""
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    b, hh, ww, _ = arr.shape
    small = arr[:, :hh // ratio * ratio, :ww // ratio * ratio].reshape(b, hh // ratio, ratio, ww // ratio, ratio, 3).mean((2, 4))
    return [read(x.transpose(2, 0, 1) * 2 - 1, scale) for x in small]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (95% for z = 1.96): unlike p +- z sqrt(p(1-p)/n) it
    stays inside [0, 1] and does not collapse to a point at 0 or n successes."""
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def summary(readings: list[Reading]) -> dict:
    """The benchmark figures of one set of pictures (rates with their Wilson 95% intervals)."""
    n = len(readings)
    repeated, clean = sum(r.objects > 1 for r in readings), sum(r.clean for r in readings)
    return {
        "repetition_rate": repeated / n,
        "repetition_ci": wilson_interval(repeated, n),
        "one_object_rate": sum(r.objects == 1 for r in readings) / n,
        "mean_objects": float(np.mean([r.objects for r in readings])),
        "size_ratio": float(np.mean([r.size_ratio for r in readings])),
        "clean_rate": clean / n,
        "clean_ci": wilson_interval(clean, n),
        "residual_rms": float(np.median([r.residual_rms for r in readings])),
    }
