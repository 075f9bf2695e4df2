"""Aspect-ratio bucketing: train on images of many shapes without squashing them (as NovelAI and SDXL do).

A fixed set of bucket sizes (h, w), all of about the same area. Each image goes to the bucket whose aspect
ratio is closest to its own (compared in log space, so 1:2 and 2:1 are equally far from 1:1), is resized,
keeping its aspect ratio, to the smallest size that covers the bucket, and is cropped to it. A batch holds
images of one bucket only, so it stacks into one tensor.

    data.buckets: [[256, 256], [192, 320], [320, 192]]        # explicit sizes (h, w)
    data.buckets: {max_area: 65536, step: 64, max_ratio: 2.0}  # every (h, w), multiples of step, h·w ≤ max_area
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from ldm.data.transforms import WHITE, pil_to_tensor, to_rgb

Size = tuple[int, int]  # (height, width)


def buckets_from_max_area(max_area: int, step: int = 64, max_ratio: float = 2.0) -> list[Size]:
    """For each width (a multiple of ``step``), the tallest height (a multiple of ``step``) with h·w ≤ max_area;
    sizes whose long side exceeds ``max_ratio`` × their short side are left out."""
    if max_area < step * step:
        raise ValueError(f"bucket max_area {max_area} is smaller than one step² ({step}² = {step * step})")
    if max_ratio < 1:
        raise ValueError(f"bucket max_ratio must be >= 1, got {max_ratio}")
    sizes = set()
    for width in range(step, max_area // step + 1, step):
        height = (max_area // width) // step * step
        if height >= step and max(height, width) <= max_ratio * min(height, width):
            sizes.add((height, width))
    return sorted(sizes, key=lambda s: s[0] / s[1])


class AspectRatioBuckets:
    """The bucket sizes (h, w) and the rule that picks one for an image."""

    def __init__(self, sizes: Iterable[Sequence[int]], step: int = 1):
        parsed: list[Size] = []
        for size in sizes:
            if len(size) != 2 or any(int(x) != x or x < 1 for x in size):
                raise ValueError(f"a bucket is a pair of positive integers (height, width), got {list(size)}")
            h, w = int(size[0]), int(size[1])
            if h % step or w % step:
                raise ValueError(f"bucket {h}x{w}: both sides must be multiples of {step}")
            parsed.append((h, w))
        if not parsed:
            raise ValueError("no buckets given")
        self.sizes: list[Size] = sorted(set(parsed), key=lambda s: s[0] / s[1])
        self._log_ratios = [math.log(h / w) for h, w in self.sizes]

    @classmethod
    def from_config(cls, config: Any) -> AspectRatioBuckets:
        """A list of [h, w] pairs, or a rule {max_area, step (64), max_ratio (2.0)}."""
        if isinstance(config, AspectRatioBuckets):
            return config
        if isinstance(config, Mapping):
            unknown = set(config) - {"max_area", "step", "max_ratio"}
            if unknown or "max_area" not in config:
                raise ValueError(f"data.buckets as a rule takes max_area (required), step and max_ratio; "
                                 f"got {sorted(config)}")
            step = int(config.get("step", 64))
            return cls(buckets_from_max_area(int(config["max_area"]), step, float(config.get("max_ratio", 2.0))),
                       step=step)
        if isinstance(config, Iterable) and not isinstance(config, (str, bytes)):
            return cls([list(size) for size in config])
        raise ValueError(f"data.buckets must be a list of [height, width] or {{max_area: ...}}, got {config!r}")

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def max_side(self) -> int:
        return max(max(size) for size in self.sizes)

    def assign(self, width: int, height: int) -> Size:
        """The bucket whose aspect ratio is nearest the image's (log h/w); ties go to the squarer bucket."""
        ratio = math.log(height / width)
        best = min(range(len(self.sizes)), key=lambda i: (abs(self._log_ratios[i] - ratio), abs(self._log_ratios[i])))
        return self.sizes[best]

    def __repr__(self) -> str:
        return f"AspectRatioBuckets({[f'{h}x{w}' for h, w in self.sizes]})"


def resize_to_cover(image: Image.Image, size: Size) -> Image.Image:
    """Scale, keeping the aspect ratio, to the smallest size that covers (h, w) on both sides."""
    height, width = size
    scale = max(height / image.height, width / image.width)
    new_w = max(width, round(image.width * scale))
    new_h = max(height, round(image.height * scale))
    if (new_w, new_h) == image.size:
        return image
    return image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


class BucketTransform:
    """PIL image → float tensor (3, h, w) in [-1, 1] for its bucket: resize to cover, crop (center or random),
    optional horizontal flip. Drop-in for ImageTransform (the image's shape tells its bucket)."""

    def __init__(self, buckets: AspectRatioBuckets, random_crop: bool = False, flip_prob: float = 0.0,
                 background: tuple[int, int, int] = WHITE):
        self.buckets = buckets
        self.random_crop = random_crop
        self.flip_prob = flip_prob
        self.background = tuple(background)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image, self.background)
        height, width = self.buckets.assign(image.width, image.height)
        image = resize_to_cover(image, (height, width))
        if self.random_crop:
            left = int(torch.randint(0, image.width - width + 1, ()).item())
            top = int(torch.randint(0, image.height - height + 1, ()).item())
        else:
            left, top = (image.width - width) // 2, (image.height - height) // 2
        tensor = pil_to_tensor(image.crop((left, top, left + width, top + height)))  # (3, h, w)
        if self.flip_prob > 0.0 and torch.rand(()).item() < self.flip_prob:
            tensor = tensor.flip(-1)
        return tensor

    def __repr__(self) -> str:
        return f"BucketTransform({self.buckets}, random_crop={self.random_crop}, flip_prob={self.flip_prob})"


def batch_by_bucket(samples: Iterable[dict], batch_size: int,
                    collate: Callable[[list[dict]], dict]) -> Iterator[dict]:
    """Group samples by image size; a bucket's batch leaves as soon as it holds batch_size samples. What is left
    when the stream ends leaves as smaller batches, one per bucket."""
    pending: dict[tuple[int, ...], list[dict]] = {}
    for sample in samples:
        bucket = pending.setdefault(tuple(sample["image"].shape[-2:]), [])
        bucket.append(sample)
        if len(bucket) == batch_size:
            yield collate(bucket)
            bucket.clear()
    for bucket in pending.values():
        if bucket:
            yield collate(bucket)


class BucketBatches(torch.utils.data.IterableDataset):
    """A dataset's samples as batches of one bucket each (batch_by_bucket), made where the samples are made, in
    each DataLoader worker; the DataLoader passes them on as they are (``batch_size=None``)."""

    def __init__(self, samples: Iterable[dict], batch_size: int, collate: Callable[[list[dict]], dict]) -> None:
        self.samples = samples
        self.batch_size = batch_size
        self.collate = collate

    def __iter__(self) -> Iterator[dict]:
        return batch_by_bucket(self.samples, self.batch_size, self.collate)
