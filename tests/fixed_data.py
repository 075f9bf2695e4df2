"""Deterministic training data for comparing runs across world sizes (`data=fixed`, tests/configs/data).

Global batch k holds samples k·G … k·G + G − 1; on W ranks, rank r gets the r-th of W equal, contiguous
slices of it. So one process with batch G and W processes with batch G/W see the same samples at every step.
Each sample's image and caption are functions of its index alone.
"""

from __future__ import annotations

import lightning as L
import torch

WORDS = ["red apple", "snowman", "owl", "key", "pig", "grapes", "droplet"]


class FixedSamples(torch.utils.data.Dataset):
    def __init__(self, indices: list[int], resolution: int):
        self.indices = indices
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        g = torch.Generator().manual_seed(index)
        # a smooth random image in [-1, 1]: a coarse grid upsampled
        coarse = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
        image = torch.nn.functional.interpolate(coarse, size=self.resolution, mode="bilinear")[0]
        return {"image": image, "caption": WORDS[index % len(WORDS)], "key": f"sample{index:06d}"}


class FixedBatches(L.LightningDataModule):
    def __init__(self, global_batch_size: int = 4, resolution: int = 32, steps: int = 3, **_ignored):
        super().__init__()
        self.global_batch_size = global_batch_size
        self.resolution = resolution
        self.steps = steps

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if self.global_batch_size % world:
            raise ValueError(f"global batch {self.global_batch_size} does not split over {world} ranks")
        per_rank = self.global_batch_size // world
        indices = [k * self.global_batch_size + rank * per_rank + j
                   for k in range(self.steps) for j in range(per_rank)]
        return torch.utils.data.DataLoader(FixedSamples(indices, self.resolution), batch_size=per_rank,
                                           shuffle=False, num_workers=0)
