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
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ldm.data.datamodule import ShardDataModule
from ldm.data.decoders import MissingCaption, caption_or_skip, collate_samples, read_caption
from ldm.data.shards import ShardDataset
from ldm.data.specs import ShardSpec
from ldm.data.stages import PassState
from ldm.data.stats import DataStats

LATENT_FIELDS = {"latent.npy": "latent", "std.npy": "latent_std", "context.npy": "context", "mask.npy": "mask"}
# corrupt_latent: a .npy that does not load; no_latent: a sample without latent.npy
LATENT_SKIP_REASONS: tuple[str, ...] = ("corrupt_latent", "no_latent", "no_caption", "shard_error")


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


@dataclass
class LatentDecoder:
    """A cached sample → {"latent", "latent_std", "caption", "key"} (+ "context", "mask" when cached): the
    sample decoder of ShardDataset for cached-latent shards, with their own skip reasons."""

    missing_caption: MissingCaption = "skip"

    skip_reasons: ClassVar[tuple[str, ...]] = LATENT_SKIP_REASONS

    def __call__(self, sample: dict[str, Any], state: PassState) -> dict[str, Any] | None:
        key = str(sample.get("__key__", "?"))
        url = str(sample.get("__url__", "?"))
        if "latent.npy" not in sample:
            members = sorted(k for k in sample if not k.startswith("__"))
            state.skip("no_latent", key, url, f"no latent.npy (members {members}): not a cached-latent shard?")
            return None
        if "context.npy" in sample:  # the text context is cached: the caption itself is not needed
            caption: str | None = read_caption(sample)
        else:
            caption = caption_or_skip(sample, key, url, self.missing_caption, state)
            if caption is None:
                return None
        try:
            out: dict[str, Any] = {name: load_npy(sample[ext]) for ext, name in LATENT_FIELDS.items() if ext in sample}
        except Exception as exn:  # noqa: BLE001 - truncated or malformed .npy
            state.skip("corrupt_latent", key, url, repr(exn)[:200])
            return None
        if "mask" in out:
            out["mask"] = out["mask"].bool()
        out.update(caption=caption, key=key)
        return out

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_latents(samples)


class LatentShardDataset(ShardDataset):
    """A ShardDataset whose samples are cached posteriors instead of images (same splitting, shuffling,
    resampling, epochs and skip counting): the shard stages with LatentDecoder. Crops and flips were fixed when
    the cache was written, so there are no image options."""

    def __init__(
        self,
        shards: ShardSpec,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        missing_caption: MissingCaption = "skip",
        seed: int = 0,
        stats: DataStats | None = None,
        split_nodes: bool = True,
    ) -> None:
        super().__init__(shards, shuffle=shuffle, shuffle_buffer=shuffle_buffer, resampled=resampled,
                         epoch_length=epoch_length, missing_caption=missing_caption, seed=seed, stats=stats,
                         split_nodes=split_nodes, decoder=LatentDecoder(missing_caption))


class LatentDataModule(ShardDataModule):
    """ShardDataModule over cached-latent shards. ``resolution`` is the image size the latents were encoded
    from (it sets the default sample size); crops and flips were fixed when the cache was written."""

    def __init__(self, train_shards, *args, buckets: Any = None, **kwargs) -> None:
        if buckets is not None:
            raise ValueError("data.buckets does not apply to cached latents: bucket the images when caching")
        super().__init__(train_shards, *args, **kwargs)

    def sample_decoder(self) -> LatentDecoder:
        return LatentDecoder(self.missing_caption)
