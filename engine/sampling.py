"""Few-step flow-matching schedule (Euler), self-contained and torch-free.

Convention: x_t = (1 - sigma) * x0 + sigma * noise, the model predicts v ~ noise - x0, and one Euler
step is x <- x + (sigma_next - sigma) * v. Sigmas are derived, never hard-coded, the way diffusers'
FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift) does for `steps` steps:
sigma_min = shift(1/1000); base = linspace(1, sigma_min, steps); sigmas = shift(base) + [0],
with shift(s) = k*s / (1 + (k-1)*s). Steps 4, shift 3 give 1.0, 0.85769, 0.60215, 0.00893, 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def shifted(sigma: np.ndarray | float, shift: float) -> np.ndarray:
    s = np.asarray(sigma, dtype=np.float64)
    return shift * s / (1.0 + (shift - 1.0) * s)


@dataclass(frozen=True)
class FlowSchedule:
    """sigmas[i] is step i's input noise level; sigmas[-1] == 0 (the clean latent)."""

    sigmas: tuple[float, ...]

    @classmethod
    def make(cls, steps: int, shift: float) -> FlowSchedule:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        sigma_min = float(shifted(1.0 / NUM_TRAIN_TIMESTEPS, shift))
        base = np.linspace(1.0, sigma_min, steps)
        return cls(tuple(float(s) for s in shifted(base, shift)) + (0.0,))

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def timestep(self, i: int) -> float:
        """The model's timestep input for step i (0..1000)."""
        return self.sigmas[i] * NUM_TRAIN_TIMESTEPS

    def delta(self, i: int) -> float:
        """sigma_{i+1} - sigma_i, the Euler step size (negative)."""
        return self.sigmas[i + 1] - self.sigmas[i]
