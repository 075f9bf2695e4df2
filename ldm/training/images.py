"""Writing image grids during training: to the run directory always, and to the loggers that can show images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def log_image(trainer, key: str, image: Image.Image, caption: str | None = None) -> Path | None:
    """Save ``image`` under ``<run dir>/images/<key>_<step>.png`` (rank 0) and hand it to image-capable loggers."""
    if not trainer.is_global_zero:
        return None
    step = trainer.global_step
    out_dir = Path(trainer.default_root_dir) / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{key.replace('/', '_')}_{step:06d}.png"
    image.save(path)
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # WandbLogger
            logger.log_image(key=key, images=[image], step=step, caption=[caption] if caption else None)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
            logger.experiment.add_image(key, np.asarray(image), step, dataformats="HWC")
    return path
