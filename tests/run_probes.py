"""Callbacks the end-to-end tests add to real training runs (`+callbacks.NAME._target_=run_probes.X`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch


class RecordKeys(L.Callback):
    """Writes the sample keys each rank trained on to OUT/keys_rank<r>.txt."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"keys_rank{trainer.global_rank}.txt", "a") as f:
            f.write("\n".join(batch["key"]) + "\n")


class RecordStart(L.Callback):
    """At the start of training, writes the step and a checksum of the EMA weights to OUT/start.json."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_start(self, trainer, pl_module) -> None:
        ema = pl_module.ema.model.state_dict()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({
            "global_step": trainer.global_step,
            "ema_checksum": float(sum(v.double().sum() for v in ema.values())),
            "ema_num_updates": int(pl_module.ema.num_updates),
        }))


def ema_checksum(state_dict: dict[str, torch.Tensor]) -> float:
    return float(sum(v.double().sum() for k, v in state_dict.items() if k.startswith("ema.model.")))


class RecordLoss(L.Callback):
    """Appends {"rank", "step", "loss", "batch"} per training batch to OUT/loss_rank<r>.jsonl."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.out / f"loss_rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"rank": trainer.global_rank, "step": trainer.global_step,
                                "loss": float(loss), "batch": len(batch["key"]), "time": time.time()}) + "\n")


class FailOnRank(L.Callback):
    """Raises on one rank at one step: how does a multi-process run end when a single rank dies?"""

    def __init__(self, rank: int = 1, step: int = 1):
        self.rank = rank
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"simulated failure on rank {self.rank} at step {self.step}")


class PoisonBatch(L.Callback):
    """Puts a NaN into one rank's images at one step (the loss of that rank becomes NaN)."""

    def __init__(self, rank: int = 1, step: int = 1):
        self.rank = rank
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch["image"][0] = float("nan")


class StepFile(L.Callback):
    """Writes the optimizer step reached to OUT after every batch: a test that kills the run knows where it was."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.out.write_text(str(trainer.global_step))


class LearningRateSpike(L.Callback):
    """Multiplies every learning rate by ``factor`` from optimizer step ``step`` on: a run that trains sanely, then
    diverges (as one does when a schedule or a data change goes wrong mid-run)."""

    def __init__(self, step: int = 4, factor: float = 1e9):
        self.step = step
        self.factor = factor
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not self.done:
            self.done = True
            for config in trainer.lr_scheduler_configs:
                config.scheduler.base_lrs = [lr * self.factor for lr in config.scheduler.base_lrs]
            for group in trainer.optimizers[0].param_groups:
                group["lr"] *= self.factor


class PaddedSave(L.Callback):
    """Adds a padding tensor of ``megabytes`` to every checkpoint, so that writing one takes long enough for a test
    to kill the process in the middle of it."""

    def __init__(self, megabytes: int = 64):
        self.megabytes = megabytes

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["padding"] = torch.ones(self.megabytes * 2**18)  # float32: 4 bytes each
