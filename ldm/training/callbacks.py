"""Callbacks: sample grids during stage-2 training, data statistics, and a guard against saving NaN weights."""

from __future__ import annotations

import logging

import lightning as L
import torch

from ldm.images import grid_image
from ldm.pipeline import LatentDiffusionPipeline
from ldm.training.divergence import resume_advice
from ldm.training.images import log_image

log = logging.getLogger(__name__)


class SampleImages(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end of training, generate a grid for fixed prompts
    with the EMA weights, save it under ``<run dir>/images/`` and hand it to the loggers."""

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 1000,
        n_per_prompt: int = 1,
        steps: int = 25,
        sampler: str = "ddim",
        cfg_scale: float = 3.0,
        seed: int = 0,
        use_ema: bool = True,
        at_train_end: bool = True,
        upscale_to: int = 128,
    ):
        super().__init__()
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.n_per_prompt = n_per_prompt
        self.steps = steps
        self.sampler = sampler
        self.cfg_scale = cfg_scale
        self.seed = seed
        self.use_ema = use_ema
        self.at_train_end = at_train_end
        self.upscale_to = upscale_to
        self._last_step = -1

    def _sample(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step == self._last_step or not self.prompts:
            return
        self._last_step = trainer.global_step
        # Every rank enters: under trainer=fsdp without an EMA the U-Net's weights are gathered for sampling.
        with pl_module.sampling_weights(self.use_ema):
            if trainer.is_global_zero:
                self._sample_on_this_rank(trainer, pl_module)

    def _sample_on_this_rank(self, trainer: L.Trainer, pl_module) -> None:
        was_training = pl_module.training
        pl_module.eval()
        count = len(self.prompts) * self.n_per_prompt
        log.info("sampling a grid of %d images (%d %s steps) at step %d", count, self.steps, self.sampler,
                 trainer.global_step)
        try:
            pipe = LatentDiffusionPipeline.from_module(pl_module, use_ema=self.use_ema)
            result = pipe.generate(self.prompts, n=self.n_per_prompt, steps=self.steps, sampler=self.sampler,
                                   cfg_scale=self.cfg_scale, seed=self.seed,
                                   progress=trainer.progress_bar_callback is not None)
        finally:
            pl_module.train(was_training)
        images = result.images
        grid = grid_image(images, nrow=len(self.prompts) if self.n_per_prompt == 1 else self.n_per_prompt,
                          upscale=max(1, self.upscale_to // images.shape[-1]))
        path = log_image(trainer, "samples", grid, caption=" | ".join(self.prompts))
        log.info("sample grid at step %d written to %s", trainer.global_step, path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end:
            with torch.no_grad():
                self._sample(trainer, pl_module)


class LogLastStep(L.Callback):
    """Lightning sends metrics to the loggers every ``trainer.log_every_n_steps`` steps only, so a run shorter than
    that logged nothing (no metrics.csv), and the last values logged were up to that many steps old. It also logs
    whenever the loop is asked to stop: this asks at the step where ``max_steps`` ends training anyway."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class DataStatsLogger(L.Callback):
    """Logs how many samples the data pipeline yielded and skipped (corrupt image, missing caption, ...), and
    says so at the end of training, so a bad shard is visible rather than silently thinning the data."""

    def __init__(self, every_n_steps: int = 50):
        super().__init__()
        self.every_n_steps = every_n_steps

    @staticmethod
    def _stats(trainer) -> dict[str, int]:
        datamodule = getattr(trainer, "datamodule", None)
        return datamodule.data_stats() if hasattr(datamodule, "data_stats") else {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            stats = self._stats(trainer)
            if stats:
                pl_module.log_dict({f"data/{k}": float(v) for k, v in stats.items()}, batch_size=1)

    def on_train_end(self, trainer, pl_module) -> None:
        stats = self._stats(trainer)
        skipped = {k: v for k, v in stats.items() if "/skipped/" in k and v}
        if skipped:
            log.warning("data: skipped samples on rank %d: %s", trainer.global_rank,
                        ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
        elif stats:
            log.info("data: no samples skipped on rank %d (%s)", trainer.global_rank,
                     ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))


class FiniteWeightsGuard(L.Callback):
    """Refuses to write a checkpoint whose parameters hold NaN or inf, so a diverged run never replaces the last
    good `last.ckpt`. Every rank checks its own weights (its shard under FSDP) and the counts are summed, so
    all ranks stop together with the same error, before anything is written."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Parameters only (trained weights, frozen parts, the EMA copy): some buffers hold -inf on purpose, e.g.
        # a text encoder's additive causal attention mask.
        bad = [name for name, t in pl_module.named_parameters()
               if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]
        count = torch.tensor(float(len(bad)), device=pl_module.device)
        if trainer.world_size > 1:
            count = trainer.strategy.reduce(count, reduce_op="sum")
        if count.item() > 0:
            shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
            raise FloatingPointError(
                f"refusing to save a checkpoint at step {trainer.global_step}: non-finite weights "
                f"({shown or 'on another rank'}). {resume_advice(trainer, pl_module)}")

