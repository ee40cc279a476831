"""LR condition injection, DemoFusion's training-free form: a low-resolution result guides a
high-resolution pass.

Two mechanisms, both weighted by DemoFusion's cosine factor cf(t) = (1 + cos(pi (1000 - t) / 1000)) / 2
of the model timestep t (0..1000; cf = 1 at the noisiest step, 0 at the clean end):

* skip residual: the sampler state x is pulled toward z'(sigma) = the upsampled low-res latent noised
  to sigma with ONE fixed noise sample: x <- (1 - c1) x + c1 z', c1 = skip_strength * cf^alpha1;
* dilated global path: the model also denoises Gaussian-blurred strided sub-lattices of x (each the
  model's native size); their predicted noise is re-applied to the un-blurred x, and the result is
  mixed in: D <- (1 - c2) D + c2 D_G, c2 = global_strength * cf^alpha2, blur std = blur_sigma *
  (0.99 cf^alpha3 + 0.01).

The state blend is exact only where the sampler's state can be changed (the LR-Guided Sampler in
samplers/lr_guided.py). As a model patch, the wrapper feeds the blended x' to the model and returns
the denoised estimate that makes an Euler step from x land where the Euler step from x' lands
(`euler_consistent_denoised`): exact for Euler, an approximation for other samplers.

Pure torch: ComfyUI objects (model_sampling, the guider) are used only through the attributes the
sampler hands in, so this module imports nothing from ComfyUI.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


KEY = "ultrares.lr_inject"
# Set in transformer_options by the LR-Guided Sampler: it blends the state itself.
STATE_BLENDED = "ultrares.lr_inject.state_blended"
# Weights below this count as zero: they move the result by less than half-precision rounding, and
# a zero weight lets the guided sampler hand the rest of the schedule to the wrapped sampler at once.
MIN_WEIGHT = 1e-3
UPSCALE_METHODS = ("bicubic", "bilinear", "nearest-exact", "area")
# What a guide of another aspect ratio than the sampled latent does (the first refuses it).
ASPECT_MODES = ("refuse", "center crop", "stretch")


def same_aspect(guide, target) -> bool:
    """(h, w) pairs of one aspect ratio, up to one guide pixel of rounding: |h W - H w| <= max(H, W)."""
    (h, w), (height, width) = guide, target
    return abs(h * width - height * w) <= max(height, width)


def center_crop(latent: torch.Tensor, target) -> torch.Tensor:
    """The largest centred part of `latent` with the aspect ratio of `target` (h, w)."""
    h, w = latent.shape[-2:]
    height, width = target
    if h * width > height * w:  # guide too tall: crop rows
        rows = max(1, round(w * height / width))
        return latent[..., (h - rows) // 2:(h - rows) // 2 + rows, :]
    cols = max(1, round(h * width / height))
    return latent[..., (w - cols) // 2:(w - cols) // 2 + cols]


# What c1 and c2 fade with: DemoFusion's cf(t) of the model timestep, or the share p = i / n of the
# window's sampling steps already done ((1 + cos(pi p)) / 2 or 1 - p). On schedules that spend many
# steps at low sigma (karras) the step-based fades keep more weight in the late steps.
FADES = ("demofusion", "step cosine", "step linear")


def cosine_factor(t: float) -> float:
    """DemoFusion's cf(t): 1 at t = 1000 (pure noise), 0 at t = 0 (clean)."""
    return 0.5 * (1.0 + math.cos(math.pi * (1000.0 - t) / 1000.0))


@dataclass(frozen=True)
class GuidanceSchedule:
    """The three per-step weights as functions of the model timestep t (0..1000)."""

    skip_strength: float = 1.0
    alpha1: float = 3.0
    global_strength: float = 0.0
    alpha2: float = 1.0
    blur_sigma: float = 0.8
    alpha3: float = 1.0
    fade: str = "demofusion"  # FADES: what c1 and c2 fade with (the blur always fades with cf(t))

    def fade_factor(self, t: float, progress: float) -> float:
        """1 at the start, falling toward 0: cf(t), or the step-based fade of progress = i / n."""
        if self.fade == "demofusion":
            return cosine_factor(t)
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if self.fade == "step cosine" else 1.0 - progress

    def _weight(self, strength: float, alpha: float, t: float, progress: float) -> float:
        w = strength * self.fade_factor(t, progress) ** alpha
        return w if w >= MIN_WEIGHT else 0.0

    def skip_weight(self, t: float, progress: float = 0.0) -> float:
        """c1: how far the state is pulled toward the noised low-res latent."""
        return self._weight(self.skip_strength, self.alpha1, t, progress)

    def global_weight(self, t: float, progress: float = 0.0) -> float:
        """c2: the share of the dilated global prediction in the denoised estimate."""
        return self._weight(self.global_strength, self.alpha2, t, progress)

    def blur_std(self, t: float) -> float:
        """sigma * c3: std of the Gaussian blur on the global path's model input."""
        return self.blur_sigma * (0.99 * cosine_factor(t) ** self.alpha3 + 0.01)


def upsample_latent(latent: torch.Tensor, size: tuple[int, int], method: str = "bicubic") -> torch.Tensor:
    """Resize a [B, C, h, w] latent to `size` in latent space (DemoFusion: bicubic)."""
    if tuple(latent.shape[-2:]) == tuple(size):
        return latent
    align = {"align_corners": False} if method in ("bicubic", "bilinear") else {}
    return F.interpolate(latent, size=tuple(size), mode=method, **align)


def fixed_noise(shape, seed: int) -> torch.Tensor:
    """One standard-normal sample for the whole run, drawn on the CPU as ComfyUI's own noise is, so
    the same seed gives the same noise as a sampler node given that seed and a latent of that shape."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def blend(x: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
    return x if weight <= 0 else torch.lerp(x, target, weight)


def euler_consistent_denoised(denoised: torch.Tensor, x: torch.Tensor, x_blended: torch.Tensor,
                              sigma: float, sigma_next: float) -> torch.Tensor:
    """The denoised estimate that makes an Euler step taken from x land where the Euler step from
    x_blended lands. Euler: x_next = x + (sigma_next - sigma) (x - D) / sigma; solving
    x + h (x - D~) = x' + h (x' - D) for D~ gives D~ = D + (x' - x) sigma_next / (sigma - sigma_next)."""
    return denoised + (x_blended - x) * (sigma_next / (sigma - sigma_next))


def gaussian_blur(x: torch.Tensor, kernel_size: int, std: float) -> torch.Tensor:
    """Depthwise separable Gaussian blur with zero 'same' padding (as the reference), re-standardised
    to the input's mean and std per sample (the reference uses one global pair; per sample keeps batch
    items independent)."""
    if std <= 0 or kernel_size < 3:
        return x
    radius = kernel_size // 2
    coords = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - radius
    g = torch.exp(-coords**2 / (2 * std**2))
    g = g / g.sum()
    c = x.shape[1]
    out = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), padding=(0, radius), groups=c)
    out = F.conv2d(out, g.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), padding=(radius, 0), groups=c)
    dims = tuple(range(1, x.ndim))
    out = (out - out.mean(dims, keepdim=True)) / out.std(dims, keepdim=True).clamp_min(1e-8)
    return out * x.std(dims, keepdim=True) + x.mean(dims, keepdim=True)


def to_sublattices(x: torch.Tensor, s: int) -> torch.Tensor:
    """[B, C, H, W] (H, W multiples of s) -> [s*s*B, C, H/s, W/s], offset-major: item k*B + b is
    x[b, :, dy::s, dx::s] with k = dy*s + dx, so per-sample conditioning tiles over the offsets."""
    b, c, h, w = x.shape
    return x.view(b, c, h // s, s, w // s, s).permute(3, 5, 0, 1, 2, 4).reshape(s * s * b, c, h // s, w // s)


def from_sublattices(y: torch.Tensor, s: int) -> torch.Tensor:
    """Inverse of to_sublattices."""
    n, c, h, w = y.shape
    b = n // (s * s)
    return y.view(s, s, b, c, h, w).permute(2, 3, 4, 0, 5, 1).reshape(b, c, h * s, w * s)


def dilated_global_denoised(x: torch.Tensor, denoise, stride: int, blur_std: float) -> torch.Tensor:
    """DemoFusion's global path in denoised (x0) form: the model denoises the blurred sub-lattices
    (one batched call), and its predicted noise x~ - D(x~) is re-applied to the un-blurred latent:
    D_G = x - (x~ - D(x~)). x is padded at the top/left to a multiple of the stride, then cropped."""
    s = stride
    pad_h, pad_w = (-x.shape[-2]) % s, (-x.shape[-1]) % s
    xp = F.pad(x, (pad_w, 0, pad_h, 0), mode="replicate") if pad_h or pad_w else x
    blurred = gaussian_blur(xp, 2 * s - 1, blur_std)
    denoised_blurred = from_sublattices(denoise(to_sublattices(blurred, s)), s)
    return (xp - (blurred - denoised_blurred))[..., pad_h:, pad_w:]


def global_stride(high, low, explicit: int = 0) -> int:
    """The global path's stride: explicit, or the high-res / low-res (h, w) size ratio, rounded."""
    if explicit > 0:
        return explicit
    return max(1, round(max(high[0] / low[0], high[1] / low[1])))


def next_sigma(sample_sigmas, sigma: float):
    """The schedule's next sigma when `sigma` is one of its steps (a sampler's first model call of a
    step), else None (an intermediate evaluation of a higher-order sampler)."""
    if sample_sigmas is None:
        return None
    sigmas = sample_sigmas.reshape(-1).tolist()
    for i, s in enumerate(sigmas[:-1]):
        if math.isclose(s, sigma, rel_tol=1e-5, abs_tol=1e-8):
            return sigmas[i + 1]
    return None


class LRGuidance:
    """One injector's state (created per node execution): the low-res latent, the schedule, the fixed
    noise seed, and, while a run is sampling, the prepared targets for its latent shape.

    Installed as a PREDICT_NOISE wrapper (called once per denoiser evaluation, after CFG, on the full
    latent batch), so it sits outside every APPLY_MODEL / DIFFUSION_MODEL wrapper whatever the order
    in which nodes were applied. `error(input, problem, fix)` builds the node's input error."""

    def __init__(self, low_res: torch.Tensor, schedule: GuidanceSchedule, seed: int, window,
                 upscale_method: str = "bicubic", global_stride: int = 0, error=ValueError, aspect: str = "refuse"):
        self.low_res = low_res
        self.aspect = aspect  # an ASPECT_MODES option
        self.schedule = schedule
        self.seed = seed
        self.window = window
        self.upscale_method = upscale_method
        self.global_stride = global_stride
        self.error = error
        self._targets = None  # (shape, device, dtype) -> (x0_up, noise), cleared after each run

    # -- targets ------------------------------------------------------------------------------
    def check_target(self, shape) -> None:
        """Bad low-res input for this run's latent: a clear error before any model call."""
        lr = self.low_res
        if lr.shape[1] != shape[1]:
            raise self.error("low_res_latent", f"it has {lr.shape[1]} channels but the sampled latent has {shape[1]}",
                             "pass a latent made by the same model family (same VAE) as the one being sampled")
        if lr.shape[0] not in (1, shape[0]):
            raise self.error("low_res_latent", f"its batch size {lr.shape[0]} differs from the sampled batch size {shape[0]}",
                             "use a low-res batch of 1 (shared by all) or of the same size as the high-res batch")
        if lr.shape[-2] > shape[-2] or lr.shape[-1] > shape[-1]:
            raise self.error("low_res_latent", f"it is {lr.shape[-1]}x{lr.shape[-2]} (latent width x height), larger than "
                             f"the {shape[-1]}x{shape[-2]} latent being sampled",
                             "connect the low-resolution result and sample a latent at least as large (e.g. 2x)")
        if self.aspect == "refuse" and not same_aspect(lr.shape[-2:], shape[-2:]):
            divisor = math.gcd(shape[-1], shape[-2])
            raise self.error("low_res_latent", f"it is {lr.shape[-1]}x{lr.shape[-2]} (latent width x height), another aspect "
                             f"ratio than the {shape[-1]}x{shape[-2]} latent being sampled, so it would be stretched",
                             f"sample the guide at the target's aspect ratio ({shape[-1] // divisor}:{shape[-2] // divisor}), "
                             "or set aspect_mismatch to 'center crop' or 'stretch'")

    def guide(self, shape) -> torch.Tensor:
        """The low-res latent as it guides a latent of `shape`: centre-cropped to its aspect ratio
        when aspect_mismatch asks for it, else as given (stretched by the upsampling)."""
        if self.aspect == "center crop" and not same_aspect(self.low_res.shape[-2:], shape[-2:]):
            return center_crop(self.low_res, shape[-2:])
        return self.low_res

    def targets(self, x: torch.Tensor, process_latent_in):
        """(x0_up, noise) for this latent shape: the low-res latent upsampled to x's size in the
        sampler's latent space, and the one fixed noise sample."""
        key = (tuple(x.shape), x.device, x.dtype)
        if self._targets is None or self._targets[0] != key:
            self.check_target(x.shape)
            up = upsample_latent(self.guide(x.shape).to(x.device, torch.float32), x.shape[-2:], self.upscale_method)
            up = process_latent_in(up).expand(x.shape[0], -1, -1, -1)
            noise = fixed_noise(x.shape, self.seed).to(x.device)
            self._targets = (key, up.to(x.dtype), noise.to(x.dtype))
        return self._targets[1:]

    def clear(self, *_):
        """Drop the prepared targets (ON_CLEANUP callback: after each sampling run)."""
        self._targets = None

    def stride_for(self, shape) -> int:
        return global_stride(shape[-2:], self.guide(shape).shape[-2:], self.global_stride)

    # -- the two mechanisms ---------------------------------------------------------------------
    def timestep(self, model_sampling, sigma: torch.Tensor) -> float:
        return float(model_sampling.timestep(sigma.reshape(-1)[:1]))

    def progress(self, sigma: torch.Tensor, sample_sigmas) -> float:
        """i / n of the window's steps done (the step-based fades); sample_sigmas: the run's schedule."""
        return self.window.progress(float(sigma.reshape(-1)[0]), sample_sigmas) if self.schedule.fade != "demofusion" else 0.0

    def skip_weight(self, model_sampling, sigma: torch.Tensor, sample_sigmas=None) -> float:
        if not self.window.contains(float(sigma.reshape(-1)[0])):
            return 0.0
        return self.schedule.skip_weight(self.timestep(model_sampling, sigma), self.progress(sigma, sample_sigmas))

    def blend_state(self, x: torch.Tensor, sigma: torch.Tensor, model, sample_sigmas=None) -> torch.Tensor:
        """x <- (1 - c1) x + c1 z'(sigma); `model` is ComfyUI's BaseModel (model_sampling, latent format)."""
        c1 = self.skip_weight(model.model_sampling, sigma, sample_sigmas)
        if c1 <= 0:
            return x
        x0_up, noise = self.targets(x, model.process_latent_in)
        noised = model.model_sampling.noise_scaling(sigma.reshape(-1)[:1].to(x.dtype), noise, x0_up)
        return blend(x, noised, c1)

    def __call__(self, executor, x, timestep, model_options, seed):
        """PREDICT_NOISE wrapper: executor(x, timestep, model_options, seed) -> denoised (after CFG)."""
        self.check_target(x.shape)
        model = executor.class_obj.inner_model
        sigma = float(timestep.reshape(-1)[0])
        if not self.window.contains(sigma):
            return executor(x, timestep, model_options, seed)
        transformer_options = model_options.get("transformer_options", {})
        sample_sigmas = transformer_options.get("sample_sigmas")
        x_in, sigma_next = x, None
        if not transformer_options.get(STATE_BLENDED):
            sigma_next = next_sigma(sample_sigmas, sigma)
            if sigma_next is not None:
                x_in = self.blend_state(x, timestep, model, sample_sigmas)
        denoised = executor(x_in, timestep, model_options, seed)

        t = self.timestep(model.model_sampling, timestep)
        c2, stride = self.schedule.global_weight(t, self.progress(timestep, sample_sigmas)), self.stride_for(x.shape)
        if c2 > 0 and stride >= 2:
            n = stride * stride
            sub_timestep = timestep.repeat(n)
            global_denoised = dilated_global_denoised(
                x_in, lambda sub: executor(sub, sub_timestep, model_options, seed), stride, self.schedule.blur_std(t))
            denoised = torch.lerp(denoised, global_denoised, c2)
        if x_in is not x:
            denoised = euler_consistent_denoised(denoised, x, x_in, sigma, sigma_next)
        return denoised
