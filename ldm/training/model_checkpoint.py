"""Which checkpoints a run writes, and when: Lightning's ModelCheckpoint with the gaps of long runs closed."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

log = logging.getLogger(__name__)

# What ldm.training.checkpoint_io.atomic_torch_save writes before renaming it into place.
TEMPORARY_PATTERN = ".*.tmp-*"


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint (same arguments), with these changes:

    - **The final state is saved.** When training ends at a step that no checkpoint holds (``max_steps`` not a
      multiple of ``every_n_train_steps``), it writes one, and ``last.ckpt``. Lightning writes ``last`` at the
      end only when it never wrote it, so the last steps were trained but not saved, and sample.py went on with
      the older weights.
    - **A step is one file.** ``enable_version_counter`` defaults to false: a resumed run that reaches a step
      again replaces its checkpoint (atomically) instead of adding ``step_000003-v1.ckpt`` beside it.
    - **Nothing is written while a divergence guard holds checkpoints** (ldm.training.divergence), so
      ``last.ckpt`` stays the state from before a divergence began.
    - **Temporary files of killed saves are removed** when a run starts: a save streams into a temporary file
      beside its destination and renames it; a process killed in between leaves the temporary file (as large
      as a checkpoint), and at the start of a run nothing else writes into its checkpoint folder.
    """

    def __init__(self, *args, enable_version_counter: bool = False, **kwargs):
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            for tmp in Path(self.dirpath).glob(TEMPORARY_PATTERN):
                size = tmp.stat().st_size
                tmp.unlink(missing_ok=True)
                log.info("removed %s (%.1f MB), left by a save that was killed", tmp, size / 2**20)

    def _should_skip_saving_checkpoint(self, trainer) -> bool:
        return super()._should_skip_saving_checkpoint(trainer) or self._held(trainer)

    @staticmethod
    def _held(trainer) -> bool:
        return any(callback.holds_checkpoints() for callback in trainer.callbacks
                   if hasattr(callback, "holds_checkpoints"))

    def on_train_end(self, trainer, pl_module) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            if self._held(trainer) and not trainer.fast_dev_run:
                log.warning("training ended while its last steps look diverged: the final state is not saved; "
                            "%s is the last checkpoint", self.last_model_path or "there is no checkpoint")
            return
        candidates = self._monitor_candidates(trainer)
        if self._every_n_train_steps or self._train_time_interval:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        log.info("final state (step %d) saved to %s", trainer.global_step, self.last_model_path)
