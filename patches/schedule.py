"""When a patch is active: ComfyUI start/end percent of the schedule, read either as a share of the
sampler's steps (the reference methods count steps: ScaleCrafter is active for steps i < tau) or as
a sigma window (ComfyUI's timestep-percent convention, the same on every scheduler only in sigma).

Both windows answer `contains(sigma, sample_sigmas)` and `progress(sigma, sample_sigmas)`, where
`sample_sigmas` is the sampler's schedule (ComfyUI puts it in transformer_options["sample_sigmas"])
or None when a model call comes from outside a sampler."""

import functools
import logging
from dataclasses import dataclass

WINDOW_UNITS = ("steps (reference)", "timestep percent")


@dataclass(frozen=True)
class SigmaWindow:
    """Active while sigma_end <= sigma <= sigma_start (sigmas fall as sampling proceeds)."""

    sigma_start: float
    sigma_end: float

    @classmethod
    def from_percents(cls, model_sampling, start_percent: float, end_percent: float) -> "SigmaWindow":
        """Percents as ComfyUI's nodes use them: 0 = first step (highest sigma), 1 = the end."""
        return cls(float(model_sampling.percent_to_sigma(start_percent)), float(model_sampling.percent_to_sigma(end_percent)))

    def contains(self, sigma: float, sample_sigmas=None) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    def progress(self, sigma: float, sample_sigmas=None) -> float:
        """i / n: the share of the window's steps done before this call, counted on the sampler's
        schedule when it is known, else the sigma-space progress (0 at the start, 1 at the end)."""
        if sample_sigmas is not None:
            steps = [float(s) for s in sample_sigmas[:-1] if self.contains(float(s))]
            if steps:
                return sum(s > sigma * (1 + 1e-5) for s in steps) / len(steps)
        span = self.sigma_start - self.sigma_end
        return 0.0 if span <= 0 else min(1.0, max(0.0, (self.sigma_start - sigma) / span))


def step_index(sample_sigmas, sigma: float) -> int:
    """The sampler step a model call at `sigma` belongs to: i where sigma_{i+1} < sigma <= sigma_i
    (a step's own sigma and a higher-order sampler's intermediate evaluations alike)."""
    above = sum(float(s) >= sigma * (1 - 1e-5) for s in sample_sigmas[:-1])
    return max(0, above - 1)


@functools.lru_cache(maxsize=64)
def _notice_once(message: str) -> None:
    logging.warning(message)


@dataclass(frozen=True)
class StepWindow:
    """The reference's gate: active for the steps i of this sampling's N steps with
    start_percent * N <= i < end_percent * N (end 0.74 of 50 steps: i < 37, on any scheduler).
    Where the schedule is unknown it falls back to `fallback` (the same percents in sigma) and says so."""

    start_percent: float
    end_percent: float
    fallback: SigmaWindow
    owner: str = "UltraRes"  # the node named in the fallback notice

    @classmethod
    def from_percents(cls, model_sampling, start_percent: float, end_percent: float, owner: str = "UltraRes") -> "StepWindow":
        return cls(start_percent, end_percent, SigmaWindow.from_percents(model_sampling, start_percent, end_percent), owner)

    def steps(self, count: int) -> range:
        """The active step indices of an N-step sampling."""
        first = next((i for i in range(count) if i >= self.start_percent * count - 1e-9), count)
        end = next((i for i in range(count) if i >= self.end_percent * count - 1e-9), count)
        return range(first, max(first, end))

    def _steps_at(self, sigma: float, sample_sigmas):
        if sample_sigmas is None or len(sample_sigmas) < 2:
            _notice_once(f"{self.owner}: the sampler's schedule is unknown (a model call outside ComfyUI's samplers), "
                         f"so its {self.start_percent:g}-{self.end_percent:g} window is read as timestep percent instead of steps.")
            return None, None
        return self.steps(len(sample_sigmas) - 1), step_index(sample_sigmas, sigma)

    def contains(self, sigma: float, sample_sigmas=None) -> bool:
        active, i = self._steps_at(sigma, sample_sigmas)
        return self.fallback.contains(sigma) if active is None else i in active

    def progress(self, sigma: float, sample_sigmas=None) -> float:
        """i / tau within the window (the reference's progressive decay counts steps)."""
        active, i = self._steps_at(sigma, sample_sigmas)
        if active is None:
            return self.fallback.progress(sigma)
        return 0.0 if not active else min(1.0, max(0.0, (i - active.start) / len(active)))


def window(unit: str, model_sampling, start_percent: float, end_percent: float, owner: str = "UltraRes"):
    """The window of a node's start/end percent in its `window_unit` (a WINDOW_UNITS option)."""
    if unit == WINDOW_UNITS[0]:
        return StepWindow.from_percents(model_sampling, start_percent, end_percent, owner)
    return SigmaWindow.from_percents(model_sampling, start_percent, end_percent)


def is_first_step(transformer_options: dict, sigma: float) -> bool:
    """Whether a model call is at the first step of a sampling run (for once-per-run notices)."""
    schedule = transformer_options.get("sample_sigmas")
    return schedule is not None and len(schedule) > 1 and abs(float(schedule[0]) - sigma) <= 1e-5 * max(1.0, abs(sigma))
