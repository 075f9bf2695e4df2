"""Writing image grids: to the run directory always, and to the logger when it can show images."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

log = logging.getLogger(__name__)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → uint8 (B, H, W, 3)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a.numpy()) for a in to_uint8(images)]


def grid_image(images: torch.Tensor, nrow: int, upscale: int = 1, padding: int = 2) -> Image.Image:
    grid = make_grid(images.detach().float().clamp(-1, 1).cpu(), nrow=nrow, padding=padding, normalize=True,
                     value_range=(-1, 1), pad_value=1.0)
    image = Image.fromarray((grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    if upscale > 1:
        # Nearest keeps small (e.g. 32 px) samples crisp when shown at a readable size.
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    return image


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
            import numpy as np

            logger.experiment.add_image(key, np.asarray(image), step, dataformats="HWC")
    return path


def fit_text(draw, text: str, width: int, font) -> str:
    """Shorten text with an ellipsis until it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def labelled_grid(images: list[Image.Image], labels: list[str], ncol: int, cell: int | None = None,
                  label_height: int = 16) -> Image.Image:
    """A grid of images with each label written underneath; ``cell`` resizes them (nearest) to that side."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    cell = cell or images[0].width
    ncol = min(ncol, len(images))
    rows = (len(images) + ncol - 1) // ncol
    sheet = Image.new("RGB", (ncol * cell, rows * (cell + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % ncol) * cell, (i // ncol) * (cell + label_height)
        image = image.convert("RGB")
        sheet.paste(image if image.width == cell else image.resize((cell, cell), Image.NEAREST), (x, y))
        text = fit_text(draw, label, cell - 4, font)
        draw.text((x + (cell - draw.textlength(text, font=font)) / 2, y + cell + 1), text, fill="black", font=font)
    return sheet
