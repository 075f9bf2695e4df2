"""Images as arrays, PIL images and grids (labelled or not): for sample files, logged grids and figures."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid


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
