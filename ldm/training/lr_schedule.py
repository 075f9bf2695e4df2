"""Learning-rate schedules: linear warmup, then constant, cosine or linear decay."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("constant", "cosine", "linear")


def lr_multiplier(step: int, kind: str, warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> float:
    """The factor applied to the base learning rate after ``step`` optimizer steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if not total_steps or total_steps <= warmup_steps:
        raise ValueError(f"the '{kind}' schedule needs total_steps > warmup_steps (got {total_steps})")
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * decay


def build_lr_scheduler(
    optimizer: Optimizer,
    kind: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, kind, warmup_steps, total_steps, min_lr_ratio))
