"""Learning-rate schedules: WSD (warm-up, stable, decay), and the Kimi K2 report's recipe as ``kimi_k2``.

WSD ("warmup-stable-decay"): the rate rises linearly over ``warmup_steps`` to ``peak_lr``, stays there, and in the
last ``decay_steps`` falls to ``min_lr`` along a cosine or a straight line. Kimi K2 (arXiv 2507.20534 §2.5):
500 warm-up steps, constant 2e-4 for 10T tokens, then cosine 2e-4 → 2e-5 over 5.5T of the 15.5T tokens, weight
decay 0.1 throughout. ``kimi_k2(total_steps)`` keeps the 500 warm-up steps and the 5.5/15.5 decay fraction.
(The report's later annealing and long-context stages, 2e-5 → 7e-6, are separate runs and not part of this.)

A schedule is a pure function of the step, so resuming needs only the step count. Steps are 0-based indices of
optimizer updates: ``lr(0)`` is the first update's rate (``peak/warmup_steps``, never 0); ``lr(total_steps - 1)``
is ``min_lr``; steps past the end stay at ``min_lr``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from k2.errors import ConfigError

Decay = Literal["cosine", "linear"]

# Kimi K2 report values (TR §2.5).
KIMI_K2_PEAK_LR = 2e-4
KIMI_K2_MIN_LR = 2e-5
KIMI_K2_WARMUP_STEPS = 500
KIMI_K2_DECAY_FRACTION = 5.5 / 15.5  # cosine decay over the last 5.5T of 15.5T tokens
KIMI_K2_WEIGHT_DECAY = 0.1


@dataclass(frozen=True, kw_only=True)
class WSD:
    """Warm-up, stable, decay. Call it with a 0-based step to get that step's learning rate."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    decay_steps: int
    min_lr: float = 0.0
    decay: Decay = "cosine"

    def __post_init__(self) -> None:
        if not self.peak_lr > 0:
            raise ConfigError(f"WSD: peak_lr must be > 0, got {self.peak_lr}")
        if not 0 <= self.min_lr <= self.peak_lr:
            raise ConfigError(f"WSD: min_lr must be in [0, peak_lr={self.peak_lr}], got {self.min_lr}")
        if self.total_steps < 1:
            raise ConfigError(f"WSD: total_steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError(
                f"WSD: warmup_steps and decay_steps must be >= 0, got {self.warmup_steps}, {self.decay_steps}"
            )
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ConfigError(
                f"WSD: warmup_steps ({self.warmup_steps}) + decay_steps ({self.decay_steps}) exceed total_steps "
                f"({self.total_steps}); lower the warm-up or the decay, or train longer"
            )
        if self.decay not in ("cosine", "linear"):
            raise ConfigError(f"WSD: decay must be 'cosine' or 'linear', got {self.decay!r}")

    @property
    def decay_start(self) -> int:
        """First step of the decay phase."""
        return self.total_steps - self.decay_steps

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"WSD: step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if step < self.decay_start:
            return self.peak_lr
        if step >= self.total_steps - 1:
            return self.min_lr
        # p in (0, 1): fraction of the decay done after this step; reaches 1 on the last step.
        p = (step - self.decay_start + 1) / self.decay_steps
        if self.decay == "cosine":
            return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
        return self.peak_lr - (self.peak_lr - self.min_lr) * p

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)


def wsd(
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int,
    decay_fraction: float,
    min_lr_ratio: float,
    decay: Decay = "cosine",
) -> WSD:
    """A WSD schedule whose decay covers ``decay_fraction`` of ``total_steps`` and ends at ``min_lr_ratio·peak``."""
    if not 0.0 <= decay_fraction <= 1.0:
        raise ConfigError(f"WSD: decay_fraction must be in [0, 1], got {decay_fraction}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"WSD: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return WSD(
        peak_lr=peak_lr,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        decay_steps=round(decay_fraction * total_steps),
        min_lr=min_lr_ratio * peak_lr,
        decay=decay,
    )


def kimi_k2(total_steps: int) -> WSD:
    """The Kimi K2 pre-training schedule stretched to ``total_steps`` (needs at least 500 / (1 - 5.5/15.5) ≈ 775)."""
    return wsd(
        peak_lr=KIMI_K2_PEAK_LR,
        total_steps=total_steps,
        warmup_steps=KIMI_K2_WARMUP_STEPS,
        decay_fraction=KIMI_K2_DECAY_FRACTION,
        min_lr_ratio=KIMI_K2_MIN_LR / KIMI_K2_PEAK_LR,
        decay="cosine",
    )
