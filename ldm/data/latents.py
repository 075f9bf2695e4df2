"""Reading shards of cached latents (written by `python -m ldm.data.cache_latents`): `data=latents`.

A cached sample holds the autoencoder's posterior for one image rather than the image:
    {key}.latent.npy   the posterior mean, unscaled          (C, h, w)
    {key}.std.npy      the posterior standard deviation     (C, h, w)
    {key}.txt          the caption
    {key}.context.npy  the text encoder's context (L, d), and {key}.mask.npy its padding mask (L,)  [optional]

Batches: {"latent": (B, C, h, w), "latent_std": (B, C, h, w), "caption": [B], "key": [B],
          "context": (B, L, d), "mask": (B, L)}. The DiffusionModule samples z = mean + std·ε and scales it, as it
would for an encoded image, so training on cached latents is training on the same distribution.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from ldm.data.datamodule import ShardDataModule
from ldm.data.shards import ShardDataset, collate_samples

LATENT_FIELDS = {"latent.npy": "latent", "std.npy": "latent_std", "context.npy": "context", "mask.npy": "mask"}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


def collate_latents(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the fields; contexts of different lengths (long captions take several 77-token chunks) are padded
    with masked zeros, which attention ignores."""
    if "context" in samples[0]:
        length = max(s["context"].shape[0] for s in samples)
        for s in samples:
            pad = length - s["context"].shape[0]
            if pad:
                s["context"] = torch.nn.functional.pad(s["context"], (0, 0, 0, pad))
                s["mask"] = torch.nn.functional.pad(s["mask"], (0, pad), value=False)
    return collate_samples(samples)


class LatentShardDataset(ShardDataset):
    """A ShardDataset whose samples are cached posteriors instead of images (same splitting, shuffling,
    resampling, epochs and skip counting)."""

    collate_fn = staticmethod(collate_latents)
    # corrupt_latent: a .npy that does not load; no_latent: a sample without latent.npy
    skip_reasons = ("corrupt_latent", "no_latent", "no_caption", "shard_error")

    def _decode_sample(self, sample: dict) -> dict[str, Any] | None:
        key = str(sample.get("__key__", "?"))
        url = str(sample.get("__url__", "?"))
        if "latent.npy" not in sample:
            members = sorted(k for k in sample if not k.startswith("__"))
            self._skip("no_latent", key, url, f"no latent.npy (members {members}): not a cached-latent shard?")
            return None
        raw_caption = sample.get("txt")
        caption = raw_caption.decode("utf-8", errors="replace").strip() if raw_caption is not None else ""
        if not caption and "context.npy" not in sample:
            if self.missing_caption == "skip":
                self._skip("no_caption", key, url, "no .txt" if raw_caption is None else "empty .txt")
                return None
            self.stats.add("empty_caption")
        try:
            out: dict[str, Any] = {name: load_npy(sample[ext]) for ext, name in LATENT_FIELDS.items() if ext in sample}
        except Exception as exn:  # noqa: BLE001 - truncated or malformed .npy
            self._skip("corrupt_latent", key, url, repr(exn)[:200])
            return None
        if "mask" in out:
            out["mask"] = out["mask"].bool()
        out.update(caption=caption, key=key)
        return out


class LatentDataModule(ShardDataModule):
    """ShardDataModule over cached-latent shards. ``resolution`` is the image size the latents were encoded
    from (it sets the default sample size); crops and flips were fixed when the cache was written."""

    dataset_class = LatentShardDataset

    def __init__(self, train_shards, *args, buckets: Any = None, **kwargs) -> None:
        if buckets is not None:
            raise ValueError("data.buckets does not apply to cached latents: bucket the images when caching")
        super().__init__(train_shards, *args, **kwargs)
