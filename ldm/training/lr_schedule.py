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


class ScheduledLR(LambdaLR):
    """LambdaLR whose resume restores the step count only.

    Lightning restores the optimizer's learning rates and the scheduler's base learning rates from the checkpoint,
    so a run resumed with a lower ``model.optimizer.lr`` (what to do after a divergence) or a longer
    ``trainer.max_steps`` went on with the old ones. Here the base learning rates and the schedule's shape are this
    run's; the restored step picks the point on it. (Lightning restores the optimizer before the scheduler.)
    """

    def load_state_dict(self, state_dict: dict) -> None:
        base_lrs = list(self.base_lrs)  # this run's configuration
        super().load_state_dict(state_dict)
        self.base_lrs = base_lrs
        for group, base, factor in zip(self.optimizer.param_groups, base_lrs, self.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_lr_scheduler(
    optimizer: Optimizer,
    kind: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> ScheduledLR:
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    return ScheduledLR(optimizer, lambda step: lr_multiplier(step, kind, warmup_steps, total_steps, min_lr_ratio))
