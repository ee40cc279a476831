"""When a patch is active: ComfyUI start/end percent of the schedule, turned into a sigma window."""

from dataclasses import dataclass


@dataclass(frozen=True)
class SigmaWindow:
    """Active while sigma_end <= sigma <= sigma_start (sigmas fall as sampling proceeds)."""

    sigma_start: float
    sigma_end: float

    @classmethod
    def from_percents(cls, model_sampling, start_percent: float, end_percent: float) -> "SigmaWindow":
        """Percents as ComfyUI's nodes use them: 0 = first step (highest sigma), 1 = the end."""
        return cls(float(model_sampling.percent_to_sigma(start_percent)), float(model_sampling.percent_to_sigma(end_percent)))

    def contains(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    def progress(self, sigma: float) -> float:
        """0 at the window's start, 1 at its end (for schedules that decay across the window)."""
        span = self.sigma_start - self.sigma_end
        return 0.0 if span <= 0 else min(1.0, max(0.0, (self.sigma_start - sigma) / span))
