"""Callbacks the end-to-end tests add to real training runs (`+callbacks.NAME._target_=run_probes.X`)."""

from __future__ import annotations

import json
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
