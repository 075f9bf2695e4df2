"""Finding the coloured shapes of the shapes dataset in an image, and the measures built on it.

The detector is plain image analysis, the same for training images and samples:

1. Colour segmentation. Each pixel is converted to CIELAB and takes the label of the nearest reference colour
   (ΔE76, Euclidean in CIELAB) among the background and the palette: a perceptual distance, so dark or pale
   versions of a colour (blurred edges) still go to their hue, and the background rule is the same nearest-
   colour rule (a pixel closer to black than to every palette colour is background).
2. Objects. The 8-connected components of each colour label; components smaller than `min_area` (a fraction
   of the image, default 1.5 %: a third of the smallest object the dataset draws) are noise and dropped.
3. Shape, from two moments of the component's pixels inside its bounding box:
   lower = share of pixels in the box's lower half   (square and circle 1/2, upright triangle 3/4)
   fill  = area / box area               (square 1, circle π/4 ≈ 0.785, upright triangle 1/2)
   A triangle when lower > 0.625, else a square when fill > 0.89, else a circle: each threshold halfway between
   the ideal figures' values. Each shape is decided by the one measure that sets it apart, and both measures
   survive blur better than corner or vertex counts (a blurred triangle loses its apex, which raises its fill
   towards a circle's, but keeps most of its mass low).

`validate_detector` measures it on ground-truth images (ldm.data.build_shapes): its accuracy bounds what any
measure built on it can say. The measures below (faithfulness, the pointing game, IoU) are pure functions of
detections, masks and attention maps, so they can be checked on fixed cases.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.build_shapes import BACKGROUND, COLOURS, ShapeObject

# (fill, lower-half share) of the ideal continuous figures; the thresholds lie halfway between them.
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "circle": (np.pi / 4, 0.5),
    "square": (1.0, 0.5),
    "triangle": (0.5, 0.75),
}
TRIANGLE_LOWER = (0.5 + 0.75) / 2  # 0.625
SQUARE_FILL = (np.pi / 4 + 1.0) / 2  # 0.893
DEFAULT_MIN_AREA = 0.015


# ---------------------------------------------------------------------------------------------- colour


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 or [0, 255] floats in sRGB → (..., 3) CIELAB (D65)."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lightness = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([lightness, a, b], axis=-1)


def segment_colours(image: np.ndarray, palette: dict[str, tuple[int, int, int]],
                    background: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
    """(H, W, 3) uint8 → (H, W) int labels: 0 background, k + 1 for the k-th palette colour."""
    references = srgb_to_lab(np.array([background, *palette.values()], np.float64))  # (K + 1, 3)
    lab = srgb_to_lab(image)  # (H, W, 3)
    distance = np.linalg.norm(lab[..., None, :] - references, axis=-1)  # (H, W, K + 1)
    return distance.argmin(axis=-1)


# ---------------------------------------------------------------------------------------------- objects


def connected_components(binary: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a (H, W) bool array, each as a (H, W) bool mask, in raster order."""
    height, width = binary.shape
    seen = np.zeros_like(binary, dtype=bool)
    components = []
    for y0, x0 in zip(*np.nonzero(binary)):
        if seen[y0, x0]:
            continue
        mask = np.zeros_like(seen)
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            mask[y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and binary[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        components.append(mask)
    return components


def shape_features(mask: np.ndarray) -> tuple[float, float]:
    """(fill, lower): area over bounding-box area, and the share of pixels in the box's lower half."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    fill = len(ys) / float((y1 - y0) * (x1 - x0))
    middle = (y0 + y1) / 2.0  # pixel centres at y + 0.5; a centre exactly on the middle counts half
    centres = ys + 0.5
    lower = (np.sum(centres > middle) + 0.5 * np.sum(centres == middle)) / len(ys)
    return fill, float(lower)


def classify_shape(mask: np.ndarray) -> str:
    """'triangle', 'square' or 'circle' from the component's (fill, lower) (module docstring)."""
    fill, lower = shape_features(mask)
    if lower > TRIANGLE_LOWER:
        return "triangle"
    return "square" if fill > SQUARE_FILL else "circle"


@dataclass
class Detection:
    colour: str
    shape: str
    mask: np.ndarray = field(repr=False)  # (H, W) bool
    area: int = 0
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1, end-exclusive

    @property
    def combo(self) -> tuple[str, str]:
        return self.colour, self.shape


@dataclass
class ShapeDetector:
    """Detects the objects of a shapes image. colours: the palette names (values from build_shapes.COLOURS);
    min_area: smallest object as a fraction of the image."""

    colours: Sequence[str] = tuple(COLOURS)
    min_area: float = DEFAULT_MIN_AREA
    background: tuple[int, int, int] = BACKGROUND

    def __post_init__(self) -> None:
        self.palette = {c: COLOURS[c] for c in self.colours}

    def __call__(self, image: np.ndarray | torch.Tensor) -> list[Detection]:
        """image: (H, W, 3) uint8, or a (3, H, W) tensor in [-1, 1] as the pipeline returns. Largest first."""
        image = as_uint8(image)
        labels = segment_colours(image, self.palette, self.background)
        smallest = self.min_area * labels.size
        found = []
        for k, colour in enumerate(self.palette, start=1):
            for mask in connected_components(labels == k):
                area = int(mask.sum())
                if area < smallest:
                    continue
                ys, xs = np.nonzero(mask)
                box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
                found.append(Detection(colour, classify_shape(mask), mask, area, box))
        return sorted(found, key=lambda d: -d.area)


def as_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
        image = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
        return image.cpu().numpy()
    return np.asarray(image, np.uint8)


# ---------------------------------------------------------------------------------------------- measures


def is_faithful(detections: Sequence[Detection], prompted: Iterable[tuple[str, str]]) -> bool:
    """The image shows exactly the prompted objects: the same (colour, shape) multiset, nothing more."""
    return Counter(d.combo for d in detections) == Counter(prompted)


def shows_all(detections: Sequence[Detection], prompted: Iterable[tuple[str, str]]) -> bool:
    """Every prompted object is there (extra objects allowed)."""
    found = Counter(d.combo for d in detections)
    return all(found[c] >= n for c, n in Counter(prompted).items())


def find(detections: Sequence[Detection], colour: str | None = None, shape: str | None = None) -> Detection | None:
    """The largest detection with this colour and/or shape, or None."""
    for d in detections:  # largest first
        if (colour is None or d.colour == colour) and (shape is None or d.shape == shape):
            return d
    return None


def foreground(detections: Sequence[Detection], shape: tuple[int, int]) -> np.ndarray:
    """Union of the detected objects' masks (the layout of the image), (H, W) bool."""
    mask = np.zeros(shape, bool)
    for d in detections:
        mask |= d.mask
    return mask


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; 0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def upsample_map(attention: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (h, w) attention map bilinearly resized to the image's (H, W) (the grid's cells cover equal squares)."""
    tensor = torch.as_tensor(np.asarray(attention, np.float32))[None, None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def pointing_hit(attention: torch.Tensor | np.ndarray, mask: np.ndarray) -> bool:
    """The pointing game: the map's maximum (after upsampling to the mask's size) lies inside the mask."""
    upsampled = upsample_map(attention, mask.shape)
    y, x = np.unravel_index(int(np.argmax(upsampled)), upsampled.shape)
    return bool(mask[y, x])


def top_region(attention: torch.Tensor | np.ndarray, size: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """Pixels where the upsampled map, rescaled to [0, 1] between its minimum and maximum, is ≥ threshold."""
    upsampled = upsample_map(attention, size)
    low, high = float(upsampled.min()), float(upsampled.max())
    if high - low <= 0:
        return np.ones(size, bool)  # a flat map points everywhere
    return (upsampled - low) / (high - low) >= threshold


def top_region_iou(attention: torch.Tensor | np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    return mask_iou(top_region(attention, mask.shape, threshold), mask)


# ---------------------------------------------------------------------------------------------- validation


@dataclass
class DetectorScore:
    """Agreement of detections with ground truth over a set of images."""

    images: int = 0
    exact: int = 0  # detected (colour, shape) multiset equals the true one
    count: int = 0  # as many detections as objects
    objects: int = 0
    matched: int = 0  # true objects with a detection covering most of their mask (IoU ≥ 0.5)
    colour: int = 0  # of the matched: right colour
    shape: int = 0  # of the matched: right shape
    mask_iou_sum: float = 0.0  # of the matched

    def add(self, detections: Sequence[Detection], objects: Sequence[ShapeObject], mask: np.ndarray) -> None:
        self.images += 1
        self.exact += is_faithful(detections, [(o.colour, o.shape) for o in objects])
        self.count += len(detections) == len(objects)
        for i, obj in enumerate(objects):
            self.objects += 1
            truth = mask == i + 1
            best = max(detections, key=lambda d: mask_iou(d.mask, truth), default=None)
            if best is None or mask_iou(best.mask, truth) < 0.5:
                continue
            self.matched += 1
            self.colour += best.colour == obj.colour
            self.shape += best.shape == obj.shape
            self.mask_iou_sum += mask_iou(best.mask, truth)

    def rates(self) -> dict[str, float]:
        matched = max(self.matched, 1)
        return {
            "exact": self.exact / max(self.images, 1),
            "count": self.count / max(self.images, 1),
            "found": self.matched / max(self.objects, 1),
            "colour": self.colour / matched,
            "shape": self.shape / matched,
            "mask_iou": self.mask_iou_sum / matched,
        }


def validate_detector(detector: ShapeDetector, samples: Iterable) -> DetectorScore:
    """Run the detector on ground-truth samples (`ldm.data.build_shapes.read_shapes_samples`)."""
    score = DetectorScore()
    for sample in samples:
        score.add(detector(sample.image), sample.objects, sample.mask)
    return score
