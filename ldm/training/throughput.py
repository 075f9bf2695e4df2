"""Training throughput of a run: images per second per device and, given the model's FLOPs, model FLOP
utilisation (MFU), measured over a window of optimizer steps after a warm-up.

    python train.py experiment=sd2_base_256 ... \
        +callbacks.throughput._target_=ldm.training.throughput.MeasureThroughput \
        +callbacks.throughput.warmup_steps=50 +callbacks.throughput.flops_per_image=5.4e11 \
        +callbacks.throughput.peak_flops=989e12 +callbacks.throughput.out=throughput.json

``bench/recipe_throughput.py`` runs exactly that, with the FLOPs from ``bench/flops.py``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch

from ldm.training.evaluation import batch_size

log = logging.getLogger(__name__)


class MeasureThroughput(L.Callback):
    """Times optimizer steps ``warmup_steps`` + 1 … ``trainer.max_steps`` (the first ones hold compilation,
    autotuning and the allocator's growth) and reports, on rank 0:

        images_per_s            all ranks together
        images_per_s_per_device images_per_s / world size
        mfu                     images_per_s_per_device · flops_per_image / peak_flops   (when both are given)

    The clock covers everything a step costs in this run (data loading, the step, logging); the device is
    synchronised only at the two ends of the window. Other callbacks that run inside the window (sample grids,
    evaluation, checkpoints) count too: turn them off for a clean figure.
    """

    def __init__(self, warmup_steps: int = 20, flops_per_image: float | None = None,
                 peak_flops: float | None = None, out: str | None = None):
        """
        flops_per_image: training FLOPs per image (forward + backward: 3 × the forward, bench/flops.py).
        peak_flops: the device's peak FLOP/s for the training precision (e.g. 989e12 for dense bf16 on an H100 SXM).
        out: a JSON file for the figures (rank 0).
        """
        super().__init__()
        self.warmup_steps = int(warmup_steps)
        self.flops_per_image = flops_per_image
        self.peak_flops = peak_flops
        self.out = out
        self._start: float | None = None
        self._start_step = 0
        self._images = 0
        self.result: dict | None = None

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps taken so far
        if self._start is None:
            if step >= self.warmup_steps:
                self._sync(pl_module)
                self._start, self._start_step = time.perf_counter(), step
            return
        self._images += batch_size(batch)
        if trainer.max_steps > 0 and step >= trainer.max_steps:
            self._finish(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.result is None and self._start is not None:
            self._finish(trainer, pl_module)
        elif self._start is None and trainer.is_global_zero:
            log.warning("throughput: the run ended within the %d warm-up steps; nothing measured", self.warmup_steps)

    def _finish(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        seconds = time.perf_counter() - self._start
        steps = trainer.global_step - self._start_step
        per_device = self._images / seconds  # this rank's images (the ranks run in lockstep)
        result = {
            "steps": steps, "seconds": seconds, "world_size": trainer.world_size,
            "images_per_step": self._images * trainer.world_size / max(steps, 1),
            "images_per_s": per_device * trainer.world_size, "images_per_s_per_device": per_device,
            "seconds_per_step": seconds / max(steps, 1),
            "device": torch.cuda.get_device_name(pl_module.device) if pl_module.device.type == "cuda" else "cpu",
            "precision": str(trainer.precision),
        }
        if pl_module.device.type == "cuda":
            result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        if self.flops_per_image:
            result["flops_per_image"] = float(self.flops_per_image)
            result["tflops_per_device"] = per_device * self.flops_per_image / 1e12
            if self.peak_flops:
                result["peak_flops"] = float(self.peak_flops)
                result["mfu"] = per_device * self.flops_per_image / self.peak_flops
        self.result = result
        if trainer.is_global_zero:
            log.info("throughput: %s", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in result.items()))
            if self.out:
                Path(self.out).parent.mkdir(parents=True, exist_ok=True)
                Path(self.out).write_text(json.dumps(result, indent=2) + "\n")
