"""Lightning DataModule over webdataset shards.

Batches: {"image": float32 (B, 3, R, R) in [-1, 1], "caption": list[str] (B), "key": list[str] (B)}.

Multi-GPU: use `resampled=True` with `epoch_length` (samples per rank per epoch). Without resampling each rank
reads its own subset of shards, the ranks see different numbers of samples, and DDP can stall at epoch end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from ldm.data.buckets import AspectRatioBuckets
from ldm.data.decoders import MissingCaption
from ldm.data.shards import ShardDataset, ShardLoader
from ldm.data.specs import ShardSpec, expand_shards
from ldm.data.stages import SampleDecoder, node_info
from ldm.data.stats import DataStats

logger = logging.getLogger(__name__)


class ShardDataModule(L.LightningDataModule):
    """Training (and optional validation) batches from webdataset shards.

    Args:
        train_shards: brace pattern, glob, folder of *.tar, or a list of them (see `expand_shards`).
        val_shards: the same for validation; read once per validation run, not shuffled, not resampled.
        resolution: side of the square training images.
        batch_size: samples per batch per rank.
        num_workers: DataLoader worker processes per rank (0: read in the training process).
        shuffle_buffer: samples held for shuffling across shards (raw bytes, per worker).
        random_crop: random instead of center crop after resizing the shorter side.
        flip_prob: probability of a horizontal flip (leave 0 for data where left/right matters, e.g. text).
        resampled: draw shards with replacement forever (multi-GPU training); needs epoch_length for epochs.
        epoch_length: samples per rank per epoch in resampled mode; in plain mode a cap on the epoch.
        missing_caption: "skip" drops samples without a caption (default: for text-to-image every sample should
            have one); "empty" keeps them with "" (unconditional data, or a classifier-free-guidance share).
        seed: seed of shard order, sample shuffling and resampling (combined with epoch, rank and worker).
        buckets: aspect-ratio buckets for training (see ldm.data.buckets): a list of [height, width] or a rule
            {max_area, step, max_ratio}; each batch then holds one bucket's size. None: square `resolution`.
        build: called in `prepare_data` (once per node, before any reading) to create the shards, e.g.
            `functools.partial(build_emoji_shards, "data/emoji", size=64)`; must be idempotent, i.e. cheap when
            its output is already up to date, since it runs on every start.
    """

    def __init__(
        self,
        train_shards: ShardSpec,
        val_shards: ShardSpec | None = None,
        resolution: int = 64,
        batch_size: int = 32,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        random_crop: bool = False,
        flip_prob: float = 0.0,
        resampled: bool = False,
        epoch_length: int | None = None,
        missing_caption: MissingCaption = "skip",
        seed: int = 0,
        build: Callable[[], Any] | None = None,
        buckets: Any = None,
    ) -> None:
        super().__init__()
        if missing_caption not in ("skip", "empty"):
            raise ValueError(f"missing_caption must be 'skip' or 'empty', got {missing_caption!r}")
        if build is not None and not callable(build):
            # What is left of data.build when an override sets one of its keys for a data config without a
            # builder (data=shards): Hydra keeps a config without _target_ as it is.
            raise ValueError(f"data.build must be a shard builder (a config with _target_), got {dict(build)!r}: "
                             "remove the data.build.* overrides for data without a builder")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.random_crop = random_crop
        self.flip_prob = flip_prob
        self.resampled = resampled
        self.epoch_length = epoch_length
        self.missing_caption = missing_caption
        self.seed = seed
        self.build = build
        self.buckets = None if buckets is None else AspectRatioBuckets.from_config(buckets)
        self.train_stats: DataStats | None = None
        self.val_stats: DataStats | None = None
        self.train_dataset: ShardDataset | None = None
        self.val_dataset: ShardDataset | None = None

    def prepare_data(self) -> None:
        if self.build is not None:
            logger.info("preparing shards with %r", self.build)
            self.build()

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = ShardDataset(
                self.train_shards,
                resolution=self.resolution,
                random_crop=self.random_crop,
                flip_prob=self.flip_prob,
                shuffle=True,
                shuffle_buffer=self.shuffle_buffer,
                resampled=self.resampled,
                epoch_length=self.epoch_length,
                missing_caption=self.missing_caption,
                seed=self.seed,
                buckets=self.buckets,
                decoder=self.sample_decoder(),
            )
            self.train_stats = self.train_dataset.stats
            rank, world_size = node_info()
            logger.info("train shards: %d from %r (rank %d/%d, resampled=%s, epoch_length=%s)",
                        len(self.train_dataset.urls), self.train_shards, rank, world_size, self.resampled,
                        self.epoch_length)
            if world_size > 1 and not self.resampled:
                logger.warning("training on %d ranks without resampled=True: ranks may get different numbers "
                               "of samples and wait for each other at epoch end", world_size)
            if self.resampled and self.epoch_length is None:
                logger.warning("resampled=True without epoch_length: the training stream never ends an epoch; "
                               "bound the run with max_steps")
        if stage in (None, "fit", "validate") and self.val_shards is not None and self.val_dataset is None:
            # Each rank validates its own shards; with fewer shards than ranks every rank reads them all instead
            # (duplicated work, same metric) rather than some ranks having nothing to validate.
            _, world_size = node_info()
            self.val_dataset = ShardDataset(
                self.val_shards,
                split_nodes=len(expand_shards(self.val_shards)) >= world_size,
                resolution=self.resolution,
                shuffle=False,
                resampled=False,
                missing_caption=self.missing_caption,
                seed=self.seed,
                decoder=self.sample_decoder(),
            )
            self.val_stats = self.val_dataset.stats

    def sample_decoder(self) -> SampleDecoder | None:
        """What turns a raw sample into a training sample (see ldm.data.stages.SampleDecoder). None: images,
        decoded by ShardDataset with this module's resolution, crops, flips and buckets; cached latents
        (ldm.data.latents) bring their own."""
        return None

    def _loader(self, dataset: ShardDataset) -> ShardLoader:
        return ShardLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            # Workers stay alive between epochs: re-forking them each epoch costs more than the memory they hold.
            persistent_workers=True,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> ShardLoader:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        loader = self._loader(self.train_dataset)
        trainer = self.trainer
        if trainer is not None and trainer.global_step > 0:
            # Resuming: Lightning restores the step and epoch but restarts an iterable dataset from scratch.
            epoch = trainer.current_epoch
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if self.train_dataset.epoch_length is not None and batches >= len(loader):
                epoch, batches = epoch + 1, 0
            loader.resume_from(epoch, batches, trainer.global_step)
            logger.info("resuming the data at epoch %d after %d batches (step %d)", epoch, batches,
                        trainer.global_step)
        return loader

    def val_dataloader(self) -> ShardLoader | list:
        if self.val_shards is None:
            return []  # Lightning skips validation for an empty list
        if self.val_dataset is None:
            self.setup("validate")
        assert self.val_dataset is not None
        return self._loader(self.val_dataset)

    def data_stats(self) -> dict[str, int]:
        """Counts of yielded/skipped samples of this rank, e.g. for `self.log_dict(...)` in the LightningModule:
        {"train/yielded": .., "train/skipped/corrupt_image": .., "val/...": ..}."""
        out: dict[str, int] = {}
        for split, stats in (("train", self.train_stats), ("val", self.val_stats)):
            if stats is not None:
                out.update({f"{split}/{name}": n for name, n in stats.as_dict().items()})
        return out
