"""Image samples: one raw webdataset sample (tar members by extension) → {"image", "caption", "key"}, or skipped.

Shards follow img2dataset's layout: `{key}.jpg|jpeg|png|webp` + `{key}.txt` (+ optional `{key}.json`). The
decoder is what a ShardDataset passes every raw sample through (ldm.data.stages.decode); other sample kinds
bring their own (cached latents: ldm.data.latents.LatentDecoder).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from PIL import Image

from ldm.data.stages import PassState
from ldm.data.stats import SKIP_REASONS

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
MissingCaption = Literal["skip", "empty"]


def decode_image(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes fully (so corrupt/truncated files fail here, inside the try of the caller).

    For JPEG, `draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= draft_size on both sides:
    a large speed-up for 512px+ web images trained at 64-256px.
    """
    image = Image.open(io.BytesIO(data))
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    image.load()
    return image


def read_caption(sample: dict[str, Any]) -> str:
    """The sample's .txt caption, stripped; "" when it has none."""
    raw = sample.get("txt")
    return raw.decode("utf-8", errors="replace").strip() if raw is not None else ""


def caption_or_skip(sample: dict[str, Any], key: str, url: str, missing_caption: MissingCaption,
                    state: PassState) -> str | None:
    """The caption; a missing or empty one is skipped (missing_caption="skip": None) or kept as "" and counted
    (missing_caption="empty")."""
    caption = read_caption(sample)
    if not caption:
        if missing_caption == "skip":
            state.skip("no_caption", key, url, "no .txt" if sample.get("txt") is None else "empty .txt")
            return None
        state.stats.add("empty_caption")
    return caption


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """[{"image": (3,R,R), "caption": str, "key": str}, ...] → {"image": (B,3,R,R), "caption": [B], "key": [B]}:
    tensors are stacked, other values listed (whatever the fields, e.g. cached latents)."""
    return {
        name: torch.stack([s[name] for s in samples]) if isinstance(value, torch.Tensor) else [s[name] for s in samples]
        for name, value in samples[0].items()
    }


@dataclass
class ImageDecoder:
    """Image bytes + caption → {"image": float32 (3, H, W) in [-1, 1], "caption": str, "key": str}.

    transform: PIL image → tensor (an ImageTransform, or a BucketTransform for aspect-ratio buckets).
    draft_size: JPEGs are decoded at reduced scale down to this side (see decode_image).
    """

    transform: Callable[[Image.Image], torch.Tensor]
    draft_size: int | None = None
    missing_caption: MissingCaption = "skip"

    skip_reasons: ClassVar[tuple[str, ...]] = SKIP_REASONS

    def __call__(self, sample: dict[str, Any], state: PassState) -> dict[str, Any] | None:
        key = str(sample.get("__key__", "?"))
        url = str(sample.get("__url__", "?"))
        data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if data is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            state.skip("no_image", key, url, f"members {members}")
            return None
        caption = caption_or_skip(sample, key, url, self.missing_caption, state)
        if caption is None:
            return None
        try:
            image = self.transform(decode_image(data, draft_size=self.draft_size))
        except Exception as exn:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
            state.skip("corrupt_image", key, url, repr(exn)[:200])
            return None
        return {"image": image, "caption": caption, "key": key}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_samples(samples)
