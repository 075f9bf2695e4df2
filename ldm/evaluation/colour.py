"""Colour fidelity of reconstructions: chroma, hue and per-hue errors of images in [-1, 1].

PSNR and the L1/L2 losses mostly see luminance: an autoencoder that paints every emoji in one brown keeps its
PSNR within a few dB of a faithful one. These measures look at colour alone, on 0–255 RGB:

- chroma = max(R, G, B) − min(R, G, B), the distance from the grey axis (the "C" of HSV/HCL);
- chroma ratio = mean chroma of the reconstruction / mean chroma of the input, on the input's coloured pixels
  (chroma ≥ ``CHROMA_MIN``): 1 keeps saturation, 0 turns everything grey or one uniform tint;
- colour MAE = mean |reconstruction − input| over the three channels, on the same pixels;
- hue error = mean circular distance (degrees) between the HSV hues of input and reconstruction, same pixels.

Pixels are binned by the input's hue and brightness (``HUE_BINS``): the bins show which colours an autoencoder
gives up first (greens and purples, rare in emoji, come back olive and grey before reds and browns do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A pixel counts as coloured when max − min of its 0–255 RGB reaches this; below it, it is grey (or white).
CHROMA_MIN = 32.0
# Near-white pixels (the background the emoji are composited on) are a bin of their own so that "grey" means
# outlines and grey parts of the drawings.
WHITE_MIN = 235.0
# (name, start of hue range in degrees, end); brown/skin is decided by brightness and saturation first.
HUE_RANGES: tuple[tuple[str, float, float], ...] = (
    ("red", 350.0, 10.0),
    ("orange", 10.0, 45.0),
    ("yellow", 45.0, 70.0),
    ("green", 70.0, 165.0),
    ("cyan", 165.0, 200.0),
    ("blue", 200.0, 255.0),
    ("purple", 255.0, 290.0),
    ("pink", 290.0, 350.0),
)
BROWN = "brown/skin"
GREY = "grey"
WHITE = "white"
HUE_BINS: tuple[str, ...] = tuple(name for name, _, _ in HUE_RANGES) + (BROWN, GREY, WHITE)
CHROMATIC_BINS: tuple[str, ...] = HUE_BINS[:-2]


def to_255(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → float 0–255 (clamped, as they would be saved)."""
    return (x.float().clamp(-1, 1) + 1) * 127.5


def hsv(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hue in degrees [0, 360), saturation [0, 1], value [0, 1], chroma 0–255) of (B, 3, H, W) 0–255 RGB."""
    r, g, b = rgb.unbind(1)
    value, _ = rgb.max(1)
    chroma = value - rgb.min(1).values
    safe = chroma.clamp_min(1e-6)
    hue = torch.where(value == r, ((g - b) / safe) % 6,
                      torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue)) % 360.0
    saturation = chroma / value.clamp_min(1e-6)
    return hue, saturation, value / 255.0, chroma


def hue_bin(rgb: torch.Tensor) -> torch.Tensor:
    """Index into HUE_BINS of every pixel of (B, 3, H, W) 0–255 RGB: (B, H, W)."""
    hue, saturation, value, chroma = hsv(rgb)
    index = torch.full_like(hue, -1, dtype=torch.long)
    for i, (_, start, end) in enumerate(HUE_RANGES):
        inside = (hue >= start) & (hue < end) if start < end else (hue >= start) | (hue < end)
        index[inside] = i
    # Browns and skin tones are dark or pale oranges: OpenMoji's five skin tones have hues 25–35° with value
    # < 0.75 or saturation < 0.5; its orange (F4AA41) is bright and saturated, its red (D22F27) has hue 3°.
    warm = (hue >= 10.0) & (hue < 45.0)
    index[warm & ((value < 0.75) | (saturation < 0.5))] = HUE_BINS.index(BROWN)
    achromatic = chroma < CHROMA_MIN
    index[achromatic] = HUE_BINS.index(GREY)
    index[achromatic & (rgb.min(1).values >= WHITE_MIN)] = HUE_BINS.index(WHITE)
    return index


def hue_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Circular distance between hues in degrees, in [0, 180]."""
    d = (a - b).abs() % 360.0
    return torch.minimum(d, 360.0 - d)


@dataclass
class ColourStats:
    """Colour measures over one set of pixels (see the module docstring)."""

    pixels: int
    share: float  # of all pixels measured
    chroma_in: float
    chroma_out: float
    colour_mae: float
    hue_error: float

    @property
    def chroma_ratio(self) -> float:
        return self.chroma_out / self.chroma_in if self.chroma_in > 0 else float("nan")


def _stats(mask: torch.Tensor, x: torch.Tensor, y: torch.Tensor, hue_x, hue_y, chroma_x, chroma_y) -> ColourStats:
    n = int(mask.sum())
    if n == 0:
        nan = float("nan")
        return ColourStats(0, 0.0, nan, nan, nan, nan)
    error = (x - y).abs().mean(1)  # (B, H, W)
    return ColourStats(
        pixels=n,
        share=n / mask.numel(),
        chroma_in=float(chroma_x[mask].mean()),
        chroma_out=float(chroma_y[mask].mean()),
        colour_mae=float(error[mask].mean()),
        hue_error=float(hue_distance(hue_x, hue_y)[mask].mean()),
    )


def colour_fidelity(x: torch.Tensor, x_rec: torch.Tensor) -> tuple[ColourStats, dict[str, ColourStats]]:
    """Colour measures of reconstructions x_rec of x, both (B, 3, H, W) in [-1, 1]: (over all coloured pixels,
    {bin name: over that bin's pixels})."""
    a, b = to_255(x), to_255(x_rec)
    hue_a, _, _, chroma_a = hsv(a)
    hue_b, _, _, chroma_b = hsv(b)
    bins = hue_bin(a)
    args = (a, b, hue_a, hue_b, chroma_a, chroma_b)
    overall = _stats(chroma_a >= CHROMA_MIN, *args)
    per_bin = {name: _stats(bins == i, *args) for i, name in enumerate(HUE_BINS)}
    return overall, per_bin


def flat_squares(colours: torch.Tensor, size: int = 32, side: int = 20) -> torch.Tensor:
    """Each 0–255 RGB colour (N, 3) as a side×side square centred on a white size×size image: (N, 3, size, size)
    in [-1, 1], drawn like an emoji (a flat shape on the white background)."""
    images = torch.full((len(colours), 3, size, size), 255.0)
    lo = (size - side) // 2
    images[:, :, lo:lo + side, lo:lo + side] = colours.float()[:, :, None, None]
    return images / 127.5 - 1.0


def square_colour(images: torch.Tensor, side: int = 20, inset: int = 4) -> torch.Tensor:
    """Mean 0–255 RGB of the inner part of the squares ``flat_squares`` drew (away from their edges): (N, 3)."""
    size = images.shape[-1]
    lo = (size - side) // 2 + inset
    hi = lo + side - 2 * inset
    return to_255(images)[:, :, lo:hi, lo:hi].mean(dim=(2, 3))
