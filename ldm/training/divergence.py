"""Detecting a diverged run: stop it (or warn), and keep the last checkpoint written before it began.

A run with a learning rate far too high does not always produce NaN: its loss can climb to 1e22 with an
infinite gradient norm at every step, and a run that ends at max_steps then looks like a success. Worse, a
checkpoint written while it diverges holds the blown-up weights, and resuming from it fails at once.

Every optimizer step is checked for three signs, each decided on all ranks together:

- the loss (the mean of the step's micro-batches) is non-finite, was skipped as non-finite, or exceeds
  ``loss_factor`` × the median of the last ``window`` healthy steps (once ``min_history`` of them are known);
- the gradient norm (logged as ``train/grad_norm`` by both training stages) is non-finite: that update was
  dropped (ldm.training.gradients);
- the weights' norm grew more than ``max_weight_growth``-fold in this one step: the update dwarfs the
  weights. This is what a learning rate of 1e30 does in its first step, before any loss shows it.

A suspect step holds back checkpoints (`ldm.training.checkpointing.ModelCheckpoint` asks `holds_checkpoints`),
so `last.ckpt` stays the state from before the trouble began. ``patience`` suspect steps in a row are divergence:
``action="stop"`` ends the run with one line that names the step, the signs and the checkpoint to resume from
(exit status 1); ``action="warn"`` logs the same line, copies that checkpoint to `before_divergence.ckpt` (later
checkpoints will overwrite `last.ckpt`) and goes on. A healthy step ends the episode.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
from collections import deque
from pathlib import Path

import lightning as L
import torch

from ldm.errors import UserError

log = logging.getLogger(__name__)

ACTIONS = ("stop", "warn")


class TrainingDivergedError(UserError, RuntimeError):
    """The run diverged (DivergenceGuard with action="stop")."""


class DivergenceGuard(L.Callback):
    def __init__(
        self,
        action: str = "stop",
        patience: int = 10,
        loss_factor: float = 10.0,
        window: int = 100,
        min_history: int = 20,
        max_weight_growth: float = 2.0,
        grad_norm_key: str = "train/grad_norm",
    ):
        """
        action: "stop" (raise, the run exits with status 1) | "warn" (log it and go on).
        patience: consecutive suspect optimizer steps that make a divergence.
        loss_factor: a step's loss above loss_factor × the running median of healthy losses is suspect.
        window: how many recent healthy losses the median is taken over.
        min_history: healthy losses needed before the loss test applies (the first steps of a run fall fast).
        max_weight_growth: a step that multiplies the weights' norm by more than this is suspect (0: off).
        grad_norm_key: the logged metric that holds the step's gradient norm (missing: that sign is off).
        """
        super().__init__()
        if action not in ACTIONS:
            raise ValueError(f"divergence action must be one of {ACTIONS}, got {action!r}")
        if patience < 1 or loss_factor <= 1.0 or window < 1 or min_history < 1:
            raise ValueError("divergence guard: patience, window and min_history must be >= 1 and loss_factor > 1, "
                             f"got patience={patience}, window={window}, min_history={min_history}, "
                             f"loss_factor={loss_factor}")
        self.action = action
        self.patience = patience
        self.loss_factor = loss_factor
        self.min_history = min_history
        self.max_weight_growth = max_weight_growth
        self.grad_norm_key = grad_norm_key
        self.healthy_losses: deque[float] = deque(maxlen=window)
        self.suspect_since: int | None = None  # first step of the current run of suspect steps
        self.suspect_steps = 0
        self.reasons: dict[str, str] = {}  # sign → its latest description in this episode
        self.diverged_at: int | None = None
        self._batch_losses: list[float] = []
        self._batch_skipped = False
        self._last_step = -1
        self._weight_norm: float | None = None

    # -- what the checkpoint callback asks --------------------------------------------------------------------

    def holds_checkpoints(self) -> bool:
        """True while steps are suspect and the divergence is not yet confirmed (or confirmed in "stop" mode)."""
        return self.suspect_since is not None and (self.diverged_at is None or self.action == "stop")

    # -- hooks ------------------------------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        self._weight_norm = _weights_norm(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(outputs, dict) and outputs.get("skipped_nonfinite"):
            self._batch_skipped = True
        if isinstance(loss, torch.Tensor):
            self._batch_losses.append(float(loss.detach().float()))
        if trainer.global_step == self._last_step:
            return  # gradient accumulation: no optimizer step yet
        self._last_step = trainer.global_step
        self._check_step(trainer, pl_module)

    # -- the decision -----------------------------------------------------------------------------------------

    def _check_step(self, trainer, pl_module) -> None:
        step = trainer.global_step
        losses, skipped = self._batch_losses, self._batch_skipped
        self._batch_losses, self._batch_skipped = [], False
        loss = sum(losses) / len(losses) if losses else None
        signs = {}
        if skipped or (loss is not None and not _finite(loss)):
            signs["loss"] = f"non-finite loss ({loss if not skipped else 'update skipped'})"
        elif loss is not None and len(self.healthy_losses) >= self.min_history:
            median = statistics.median(self.healthy_losses)
            if loss > self.loss_factor * median:
                signs["loss"] = f"loss {loss:.4g} above {self.loss_factor:g}× its running median {median:.4g}"
        grad_norm = trainer.callback_metrics.get(self.grad_norm_key)
        if grad_norm is not None and not _finite(float(grad_norm)):
            signs["grad_norm"] = f"gradient norm {float(grad_norm)} (update dropped)"
        weight_norm = _weights_norm(trainer, pl_module) if self.max_weight_growth else None
        if weight_norm is not None:
            previous = self._weight_norm
            self._weight_norm = weight_norm
            if not _finite(weight_norm):
                signs["weights"] = "non-finite weights"
            elif previous and weight_norm > self.max_weight_growth * previous:
                signs["weights"] = (f"the weights' norm grew {weight_norm / previous:.3g}-fold in one step "
                                    f"({previous:.4g} → {weight_norm:.4g})")
        # One decision for all ranks: they must all hold (or write) the same checkpoints and stop together.
        suspect_ranks = _sum_over_ranks(trainer, float(bool(signs)))
        if suspect_ranks == 0:
            if loss is not None:
                self.healthy_losses.append(loss)
            if self.suspect_since is not None:
                log.info("divergence guard: step %d is healthy again after %d suspect step(s) since step %d",
                         step, self.suspect_steps, self.suspect_since)
            self.suspect_since, self.suspect_steps, self.reasons, self.diverged_at = None, 0, {}, None
            return
        if self.suspect_since is None:
            self.suspect_since = step
            log.warning("divergence guard: step %d is suspect (%s); checkpoints are held until it passes",
                        step, "; ".join(signs.values()) or "on another rank")
        self.suspect_steps += 1
        self.reasons.update(signs or {"other rank": "a sign on another rank"})
        if self.suspect_steps >= self.patience and self.diverged_at is None:
            self.diverged_at = step
            self._diverged(trainer, pl_module, step)

    def _diverged(self, trainer, pl_module, step: int) -> None:
        checkpoint = last_checkpoint(trainer)
        message = (f"training diverged at step {step}: {self.suspect_steps} suspect steps in a row since step "
                   f"{self.suspect_since} ({'; '.join(self.reasons.values())})")
        if self.action == "stop":
            raise TrainingDivergedError(f"{message}. {resume_advice(trainer, pl_module)}, or set "
                                        "callbacks.divergence.action=warn to go on")
        kept = "no checkpoint was written before it"
        if checkpoint:
            kept = Path(checkpoint).with_name("before_divergence.ckpt")
            if trainer.is_global_zero:
                _link_or_copy(Path(checkpoint), kept)
            kept = f"the last checkpoint from before it is kept as {kept}"
        log.warning("%s; %s; training goes on (callbacks.divergence.action=warn)", message, kept)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _sum_over_ranks(trainer, value: float) -> float:
    if trainer.world_size == 1:
        return value
    tensor = torch.tensor(value, device=trainer.strategy.root_device)
    return float(trainer.strategy.reduce(tensor, reduce_op="sum"))


def _trainable(pl_module) -> list[torch.nn.Parameter]:
    return [p for p in pl_module.parameters() if p.requires_grad]


def _weights_norm(trainer, pl_module) -> float:
    params = [p.detach() for p in _trainable(pl_module)]
    if not params:
        return 0.0
    total = torch.nn.utils.get_total_norm(params).float().square()  # one fused pass over the tensors
    # Under FSDP each rank holds a shard; under DDP every rank the same weights (the sum is then the norm
    # times the number of ranks, which cancels in the step-to-step ratio).
    if trainer.world_size > 1:
        total = trainer.strategy.reduce(total, reduce_op="sum")
    return float(total.sqrt())



def last_checkpoint(trainer) -> str | None:
    """The path of the run's last.ckpt if it exists (it is never written while the guard holds checkpoints)."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") if callback is not None else ""
    return path if path and os.path.exists(path) else None


def resume_advice(trainer, pl_module) -> str:
    """What to do after a run stopped on bad numbers: resume from its last checkpoint with a lower learning rate."""
    lr_key = "model.optimizer.lr" if "optimizer" in getattr(pl_module, "hparams", {}) else "model.lr"
    checkpoint = last_checkpoint(trainer)
    if checkpoint is None:
        return f"No checkpoint was written before it: lower the learning rate ({lr_key}) and start again"
    try:
        step = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("global_step", "?")
    except Exception:  # noqa: BLE001 - only for the message
        step = "?"
    return (f"The last checkpoint, {checkpoint} (step {step}), is from before it: resume from it "
            f"(ckpt_path={checkpoint}) with a lower learning rate ({lr_key})")


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)  # a hard link: no copy, and later saves replace last.ckpt's name, not this file
    except OSError:
        shutil.copy2(src, dst)
