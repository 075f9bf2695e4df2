"""PIL figures for the editing tools: attention maps over the image, labelled with their tokens, and
source/edit pairs side by side. No plotting library: a few colour stops make the heat map.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ldm.images import labelled_grid, to_pil

if TYPE_CHECKING:
    from ldm.pipeline import GenerationResult

log = logging.getLogger(__name__)

# Colour stops of a perceptually ordered map (dark blue → teal → green → yellow), value 0 … 1.
_STOPS = torch.tensor(
    [[0.27, 0.00, 0.33], [0.23, 0.32, 0.55], [0.13, 0.57, 0.55], [0.37, 0.79, 0.38], [0.99, 0.91, 0.14]]
)
# Weight of the heat map over the image in an overlay.
OVERLAY_ALPHA = 0.6


def colorize(values: Tensor) -> Tensor:
    """(H, W) values in [0, 1] → (H, W, 3) RGB floats in [0, 1] (piecewise-linear over the colour stops)."""
    scaled = values.clamp(0, 1) * (len(_STOPS) - 1)
    low = scaled.floor().long().clamp(max=len(_STOPS) - 2)
    frac = (scaled - low)[..., None]
    return _STOPS[low] * (1 - frac) + _STOPS[low + 1] * frac


def _image_tensor(image: Image.Image | Tensor, size: int) -> Tensor:
    """A PIL image or a (3, H, W) tensor in [-1, 1] → (size, size, 3) floats in [0, 1]."""
    if isinstance(image, Tensor):
        image = to_pil(image[None])[0]
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).float() / 255


def attention_overlay(image: Image.Image | Tensor, attention: Tensor, size: int = 128) -> Image.Image:
    """One token's map (h, w), normalised by its maximum, upsampled and laid over the image."""
    attention = attention.detach().float().cpu()
    attention = attention / attention.max().clamp_min(1e-12)
    upsampled = F.interpolate(attention[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    mixed = (1 - OVERLAY_ALPHA) * _image_tensor(image, size) + OVERLAY_ALPHA * colorize(upsampled)
    return Image.fromarray((mixed * 255).round().to(torch.uint8).numpy())


def attention_figure(
    image: Image.Image | Tensor, maps: Tensor, labels: Sequence[str], cell_size: int = 128, columns: int = 8
) -> Image.Image:
    """The image, then one overlay per token map (n, h, w), each labelled with its token text."""
    if maps.shape[0] != len(labels):
        raise ValueError(f"{maps.shape[0]} maps but {len(labels)} labels")
    base = _image_tensor(image, cell_size)
    cells = [Image.fromarray((base * 255).round().to(torch.uint8).numpy())]
    cells += [attention_overlay(image, m, cell_size) for m in maps]
    return labelled_grid(cells, ["image", *labels], columns)


def edit_figure(images: Sequence[Image.Image | Tensor], captions: Sequence[str], cell_size: int = 256) -> Image.Image:
    """Images side by side (source first), each captioned (its prompt)."""
    cells = []
    for image in images:
        pixels = (_image_tensor(image, cell_size) * 255).round().to(torch.uint8).numpy()
        cells.append(Image.fromarray(pixels))
    return labelled_grid(cells, list(captions), ncol=len(cells))


def save_attention_figure(
    out_dir: str | Path, index: int, result: GenerationResult, maps: Tensor, labels: Sequence[str]
) -> Path:
    """Write `attention_<index>.png` for the first image of `result` and its token maps; returns the path."""
    path = Path(out_dir) / f"attention_{index}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    attention_figure(result.images[0], maps, labels).save(path)
    log.info("wrote %s", path)
    return path


def save_edit_figure(out_dir: str | Path, index: int, result: GenerationResult) -> Path:
    """Write `edit_<index>.png`: the images of `result` (source, edit) side by side with their prompts."""
    path = Path(out_dir) / f"edit_{index}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    edit_figure(list(result.images), result.prompts).save(path)
    log.info("wrote %s", path)
    return path
