"""Image quality measured while a run trains: the ``Evaluator`` every N training images, logged against the
image count."""

from __future__ import annotations

import logging

from contextlib import nullcontext

import lightning as L
import torch
from torch.distributed.fsdp import FullyShardedDataParallel

from ldm.evaluation import Evaluator
from ldm.evaluation.emoji import read_images
from ldm.evaluation.prompts import read_prompts
from ldm.pipeline import LatentDiffusionPipeline
from ldm.training.gradients import fsdp_root

log = logging.getLogger(__name__)

IMAGES_SEEN = "eval/images_seen"
# Measures for which lower is better; a target for any other measure is a floor.
LOWER_IS_BETTER = ("fid", "kid")
MEASURES = ("fid", "kid", "clip_score", "top1", "heldout_psnr")


def batch_size(batch) -> int:
    for key in ("image", "latent"):
        if isinstance(batch, dict) and key in batch:
            return int(batch[key].shape[0])
    if isinstance(batch, dict) and "caption" in batch:
        return len(batch["caption"])
    raise ValueError("cannot tell the batch size: the batch holds no image, latent or caption")


class EvaluateImages(L.Callback):
    """Every ``every_n_images`` training images (over all ranks), at the end of training and, with
    ``at_train_start``, before the first step: samples ``prompts`` with fixed seeds from the EMA weights and
    measures them (stage 2), or reconstructs the held-out images (stage 1, ``heldout``). Every logger gets
    ``eval/<measure>`` with ``eval/images_seen`` as its x axis (wandb: a step metric of its own); in a
    multi-process run the prompts are split over the ranks.

    The evaluation draws nothing from the training's random streams (they are forked around it), so turning it
    on or off does not change what the run trains.

    With ``targets`` (e.g. MLPerf's {fid: 90, clip_score: 0.15}) the run stops after the first evaluation that
    meets all of them: fid and kid at most the target, the other measures at least."""

    def __init__(
        self,
        evaluator: Evaluator | None = None,
        every_n_images: int = 0,
        prompts: list[str] | None = None,
        use_ema: bool = True,
        at_train_start: bool = False,
        at_train_end: bool = True,
        heldout: dict | None = None,
        prompts_file: str | None = None,
        targets: dict[str, float] | None = None,
    ):
        """
        evaluator: what to sample and measure (``ldm.evaluation.Evaluator``; configs/evaluation).
        every_n_images: 0 evaluates only at the start / end.
        heldout: {shards, resolution}: stage 1 (an autoencoder): PSNR of reconstructions of these images.
        prompts_file: the prompt set instead of ``prompts``: one per line, or a .tsv/.csv with a caption column
            (ldm.evaluation.prompts), e.g. MLPerf's 30,000 COCO-2014 captions. Read when training starts.
        targets: {measure: value}: stop training once every one is met (fid, kid: at most; others: at least).
        """
        super().__init__()
        self.evaluator = evaluator or Evaluator()
        self.every_n_images = int(every_n_images or 0)
        self.prompts = list(prompts or [])
        self.use_ema = use_ema
        self.at_train_start = at_train_start
        self.at_train_end = at_train_end
        self.heldout = dict(heldout) if heldout and heldout.get("shards") else None
        self.prompts_file = prompts_file
        self.targets = {str(k): float(v) for k, v in (targets or {}).items()}
        unknown = sorted(set(self.targets) - set(MEASURES))
        if unknown:
            raise ValueError(f"evaluation targets name unknown measures {unknown}; known: {', '.join(MEASURES)}")
        self.images_seen = 0
        self._last_evaluated = -1
        self._heldout_images = None
        self._wandb_axis_set = False
        self._enabled = True

    # -- the count, saved with the checkpoint so a resumed run goes on counting ----------------------------------

    def state_dict(self) -> dict:
        return {"images_seen": self.images_seen, "last_evaluated": self._last_evaluated}

    def load_state_dict(self, state_dict: dict) -> None:
        self.images_seen = int(state_dict.get("images_seen", 0))
        self._last_evaluated = int(state_dict.get("last_evaluated", -1))

    # -- hooks ---------------------------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.prompts_file and self.heldout is None:
            self.prompts = read_prompts(self.prompts_file)
            if trainer.is_global_zero:
                log.info("evaluation: %d prompts from %s", len(self.prompts), self.prompts_file)
        if self.heldout is None and not self.prompts:
            if trainer.is_global_zero:
                log.info("evaluation: off, nothing to measure (no prompts, no held-out shards)")
            self._enabled = False
        # Missing weights, statistics or shards fail now, not after the first N images.
        elif self.heldout is not None:
            self._heldout_images, _ = read_images(self.heldout["shards"], int(self.heldout["resolution"]))
        elif not self.evaluator.has_measures:
            if trainer.is_global_zero:
                log.info("evaluation: off, no measure configured (configs/evaluation: inception + ref_stats, clip, "
                         "nearest)")
                self.evaluator.say_status()  # what each measure needs
            self._enabled = False
        else:
            with torch.random.fork_rng(devices=[]):  # building the networks draws nothing from the run's stream
                self.evaluator.prepare(pl_module.device)
            self.evaluator.say_status()
        unmeasured = self.unmeasured_targets()
        if unmeasured and trainer.is_global_zero:
            log.warning("evaluation: the targets for %s can never be met, those measures are off: training runs "
                        "to trainer.max_steps", ", ".join(unmeasured))

    def unmeasured_targets(self) -> list[str]:
        """The measures named in ``targets`` that this run does not take."""
        taken: set[str] = set()
        if self._enabled and self.heldout is not None:
            taken.add("heldout_psnr")
        elif self._enabled:
            if self.evaluator.fid_enabled:
                taken.update(("fid", "kid"))
            if self.evaluator.clip_cfg is not None:
                taken.add("clip_score")
            if self.evaluator.nearest_cfg:
                taken.add("top1")
        return sorted(set(self.targets) - taken)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_train_start and self.images_seen == 0:
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        before = self.images_seen
        self.images_seen += batch_size(batch) * trainer.world_size
        if self.every_n_images and self.images_seen // self.every_n_images > before // self.every_n_images:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end:
            self._evaluate(trainer, pl_module)

    # -- evaluating and logging ----------------------------------------------------------------------------------

    def _evaluate(self, trainer, pl_module) -> None:
        if not self._enabled or self.images_seen == self._last_evaluated:
            return
        self._last_evaluated = self.images_seen
        was_training = pl_module.training
        pl_module.eval()
        devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                if self._heldout_images is not None:
                    # under trainer=fsdp the autoencoder being trained holds shards between steps: gather it
                    fsdp = fsdp_root(trainer)
                    with FullyShardedDataParallel.summon_full_params(fsdp, writeback=False) if fsdp else nullcontext():
                        metrics = self.evaluator.evaluate_autoencoder(pl_module.autoencoder, self._heldout_images)
                else:
                    use_ema = self.use_ema and getattr(pl_module, "ema", None) is not None
                    # under trainer=fsdp without an EMA: the U-Net's weights gathered (every rank is here)
                    with pl_module.sampling_weights(use_ema):
                        pipe = LatentDiffusionPipeline.from_module(pl_module, use_ema=use_ema)
                        metrics = self.evaluator.evaluate_pipeline(pipe, self.prompts)
        finally:
            pl_module.train(was_training)
        self._log(trainer, metrics)
        if self.targets and self.targets_met(metrics):
            # Every rank holds the same gathered numbers, so every rank stops at the same step.
            if trainer.is_global_zero:
                log.info("evaluation: targets %s met at %d images (step %d): stopping", self.targets,
                         self.images_seen, trainer.global_step)
            trainer.should_stop = True

    def targets_met(self, metrics: dict[str, float]) -> bool:
        """Whether every target is met; a measure that was not taken (no weights for it) is not met."""
        for name, target in self.targets.items():
            if name not in metrics:
                return False
            value = metrics[name]
            if (value > target) if name in LOWER_IS_BETTER else (value < target):
                return False
        return True

    def _log(self, trainer, metrics: dict[str, float]) -> None:
        if not trainer.is_global_zero:
            return
        values = {f"eval/{k}": float(v) for k, v in metrics.items()}
        values[IMAGES_SEEN] = float(self.images_seen)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if not self._wandb_axis_set and hasattr(experiment, "define_metric"):  # wandb
                experiment.define_metric(IMAGES_SEEN)
                experiment.define_metric("eval/*", step_metric=IMAGES_SEEN)
            logger.log_metrics(values, step=trainer.global_step)
        self._wandb_axis_set = True
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        log.info("evaluation at %d images (step %d): %s", self.images_seen, trainer.global_step, shown)
