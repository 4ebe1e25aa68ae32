"""Warm-up / stable / decay (WSD) learning-rate schedule of the target recipe, and its application to an optimizer.

    lr(s) = peak · multiplier · (s + 1) / warmup                      s < warmup          (linear warm-up)
    lr(s) = peak · multiplier                                          warmup ≤ s < start  (constant)
    lr(s) = max(min_lr, peak · multiplier · 0.5^((s − start) / half_life))   s ≥ start     (exponential decay)

``s`` is the 0-based index of the optimizer step being taken. The warm-up starts at peak/warmup rather than 0 so no
step is wasted. The decay is BLISS's evaluation branch: the main run stays constant and a copy decays
(lr·0.5^(t/200)) before it is evaluated. ``multiplier`` is the per-round factor (BLISS halves the peak each round:
0.5^round). The schedule is a pure function of the step; its only state is where the decay starts, which an
evaluation branch sets when it forks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ScheduleConfig:
    """Learning-rate schedule (WSD): linear warm-up, constant, optional exponential decay."""

    warmup_steps: int = 2000
    """Steps of linear warm-up to the peak learning rate."""
    decay_start: int | None = None
    """Step at which exponential decay starts; None keeps the rate constant after warm-up."""
    decay_half_life: float = 200.0
    """Steps over which the decayed learning rate halves (lr · 0.5^(t / half_life))."""
    lr_multiplier: float = 1.0
    """Per-round factor on the peak learning rate (BLISS: 0.5^round)."""
    min_lr: float = 0.0
    """Floor of the decayed learning rate."""

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_half_life <= 0:
            raise ValueError(f"schedule.decay_half_life must be > 0, got {self.decay_half_life}")
        if self.lr_multiplier <= 0:
            raise ValueError(f"schedule.lr_multiplier must be > 0, got {self.lr_multiplier}")
        if self.decay_start is not None and self.decay_start < 0:
            raise ValueError(f"schedule.decay_start must be >= 0, got {self.decay_start}")


class WSDSchedule:
    """Learning rate per step for a peak rate and a :class:`ScheduleConfig`; ``Stateful`` (the decay start).

    Args:
        cfg: schedule settings.
        peak_lr: the optimizer's peak learning rate before ``cfg.lr_multiplier``.
    """

    def __init__(self, cfg: ScheduleConfig, peak_lr: float):
        self.cfg = cfg
        self.peak_lr = peak_lr
        self.decay_start = cfg.decay_start
        self.half_life = cfg.decay_half_life

    def lr(self, step: int) -> float:
        """Learning rate of the optimizer step with 0-based index ``step``."""
        peak = self.peak_lr * self.cfg.lr_multiplier
        if step < self.cfg.warmup_steps:
            return peak * (step + 1) / self.cfg.warmup_steps
        if self.decay_start is None or step < self.decay_start:
            return peak
        return max(self.cfg.min_lr, peak * 0.5 ** ((step - self.decay_start) / self.half_life))

    def start_decay(self, step: int, half_life: float | None = None) -> None:
        """Decays from ``step`` on (the evaluation branch's fork point), optionally with another half-life."""
        self.decay_start = step
        if half_life is not None:
            self.half_life = half_life

    def apply(self, optimizer, step: int, weight_decay: float) -> float:
        """Sets every parameter group's ``lr`` and ``weight_decay`` for ``step``; returns the base lr.

        megatron-core's parameter groups carry ``lr_mult`` and ``wd_mult`` (0 for biases and norms); both are
        honoured here, as megatron's own scheduler does.
        """
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
        return lr

    def state_dict(self) -> dict:
        """The decay start (everything else comes from the config)."""
        return {"decay_start": self.decay_start, "half_life": self.half_life}

    def load_state_dict(self, state: dict) -> None:
        """Restores the decay start, unless the config sets one explicitly."""
        if self.cfg.decay_start is None:
            self.decay_start = state.get("decay_start")
            self.half_life = state.get("half_life", self.half_life)
