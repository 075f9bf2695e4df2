"""The emoji demo's measures, shared by ``scripts/evaluate_emoji.py`` and the evaluation callback.

- top-1 rate: a sample is a hit when the training image nearest to it (pixel L2 at the sample resolution) is
  the one whose caption prompted it: does each caption produce its own emoji?
- PSNR of autoencoder reconstructions (posterior mode) of images it never trained on.
"""

from __future__ import annotations

import torch

from ldm.data.shards import ShardDataset


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2): (B,)."""
    mse = (x.float().clamp(-1, 1) - y.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruction_psnr(autoencoder, images: torch.Tensor) -> torch.Tensor:
    """PSNR (B,) of the autoencoder's reconstructions (posterior mode: no sampling noise) of ``images``."""
    x = images.to(next(autoencoder.parameters()).device)
    return psnr(x, autoencoder.decode(autoencoder.encode(x).mode())).cpu()


def read_images(shards, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Every image of the shards (B, 3, R, R) in [-1, 1] and its caption, in shard order. Every rank reads all."""
    dataset = ShardDataset(shards, resolution=resolution, shuffle=False, resampled=False, split_nodes=False)
    samples = list(dataset)
    return torch.stack([s["image"] for s in samples]), [s["caption"] for s in samples]


class NearestTrainingImage:
    """Top-1 hits of samples against a set of captioned training images."""

    def __init__(self, images: torch.Tensor, captions: list[str]):
        if images.shape[0] != len(captions) or not captions:
            raise ValueError(f"{images.shape[0]} training images for {len(captions)} captions")
        self.images = images.float().flatten(1)  # (M, 3·H·W)
        self.captions = list(captions)
        self.size = images.shape[-1]

    @classmethod
    def from_shards(cls, shards, resolution: int) -> "NearestTrainingImage":
        return cls(*read_images(shards, resolution))

    def hits(self, samples: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """(N,) bool: is the nearest training image of sample i the one captioned ``captions[i]``?"""
        if samples.shape[-1] != self.size:
            raise ValueError(f"samples are {samples.shape[-1]} px, the training images {self.size} px")
        distances = torch.cdist(samples.float().flatten(1).cpu(), self.images)  # (N, M)
        nearest = distances.argmin(dim=1).tolist()
        return torch.tensor([self.captions[j] == c for j, c in zip(nearest, captions)])
