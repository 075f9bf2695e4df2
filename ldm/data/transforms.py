"""Image preprocessing for training: PIL image → float tensor (3, R, R) in [-1, 1].

resize (shorter side to R, antialiased) → crop R×R (center or random) → optional horizontal flip → [-1, 1].
Transparent images are composited on white: the emoji set is RGBA with a transparent background, and a plain
`convert("RGB")` would turn that background black (transparent pixels store RGB 0,0,0).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

WHITE: tuple[int, int, int] = (255, 255, 255)


# Integer modes wider than 8 bits. PIL's convert("RGB") clips their values at 255 instead of scaling them, so a
# 16-bit grayscale PNG (mode I;16, values up to 65535) came out almost entirely white.
WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer, read as 16-bit) grayscale image as 8-bit "L": value / 257, so 65535 → 255;
    a float image ("F") as 8-bit with values in [0, 1] mapped to [0, 255] (values above 1: taken as 0-255)."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if array.size and np.nanmax(array) <= 1.0 else 1.0
        array = np.nan_to_num(array) * scale
    else:
        array = array / 257.0
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency (RGBA, LA, palette+transparency) on `background`
    and scaling 16-bit and float grayscale to 8 bits."""
    if image.mode in WIDE_INTEGER_MODES or image.mode == "F":
        image = to_8bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "RGBa", "La", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Scale so that the shorter side is `size`, keeping the aspect ratio.

    PIL's bicubic filter widens its support when downscaling, i.e. it is antialiased (unlike a plain
    strided/bilinear tensor resize, which aliases badly at large reduction factors).
    """
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    new_w = max(size, round(w * scale))
    new_h = max(size, round(h * scale))
    return image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    return tensor.to(torch.float32).div_(127.5).sub_(1.0)


class ImageTransform:
    """The training transform. Randomness uses torch's global RNG, which DataLoader seeds per worker
    (and Lightning's `seed_everything` makes reproducible)."""

    def __init__(
        self,
        resolution: int = 64,
        random_crop: bool = False,
        flip_prob: float = 0.0,
        background: tuple[int, int, int] = WHITE,
    ) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.resolution = resolution
        self.random_crop = random_crop
        self.flip_prob = flip_prob
        self.background = tuple(background)

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        r = self.resolution
        if self.random_crop:
            left = int(torch.randint(0, width - r + 1, ()).item())
            top = int(torch.randint(0, height - r + 1, ()).item())
        else:
            left = (width - r) // 2
            top = (height - r) // 2
        return left, top, left + r, top + r

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image, self.background)
        image = resize_shorter_side(image, self.resolution)
        image = image.crop(self.crop_box(*image.size))
        tensor = pil_to_tensor(image)  # (3, R, R)
        if self.flip_prob > 0.0 and torch.rand(()).item() < self.flip_prob:
            tensor = tensor.flip(-1)
        return tensor

    def __repr__(self) -> str:
        return (
            f"ImageTransform(resolution={self.resolution}, random_crop={self.random_crop}, "
            f"flip_prob={self.flip_prob}, background={self.background})"
        )
