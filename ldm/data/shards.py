"""Reading webdataset shards: tar files → {"image": (3,R,R) in [-1,1], "caption": str, "key": str}.

Shards follow img2dataset's layout: `{key}.jpg|jpeg|png|webp` + `{key}.txt` (+ optional `{key}.json`).

Two modes:
  * resampled=False (single process, validation): each pass reads every shard once. Shards are shuffled with a
    seed shared by all ranks, then split by node (rank) and by DataLoader worker, so the parts are disjoint.
    Ranks can end up with different sample counts, which makes DDP ranks wait on each other at epoch end.
  * resampled=True (multi-GPU training): every rank and worker draws shards with replacement from the full list,
    forever; `epoch_length` (samples per rank) cuts the stream into epochs of exactly that many samples per rank,
    so every rank runs the same number of steps.

Bad data never ends a run: undecodable images, samples without an image and samples without a caption are
skipped, counted in a `DataStats` (shared across DataLoader workers) and logged with their key and shard URL,
rate-limited. Only a shard set that yields nothing usable at all is an error.

The pieces: shard specs (ldm.data.specs), the stages of a pass (ldm.data.stages), the image decoder
(ldm.data.decoders), the counts (ldm.data.stats); this file puts them together as a dataset and its loader.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import webdataset as wds
from PIL import Image

from ldm.data.buckets import AspectRatioBuckets, BucketBatches, BucketTransform
from ldm.data.decoders import IMAGE_EXTENSIONS, ImageDecoder, MissingCaption, collate_samples, decode_image
from ldm.data.specs import ShardSpec, expand_shards, shorten
from ldm.data.stages import (
    PassState,
    Resume,
    SampleDecoder,
    count_raw,
    decode,
    fail_if_nothing_usable,
    node_info,
    resampled_shards,
    shard_error_handler,
    shard_order,
    shuffle_samples,
    split_by_node,
    stop_when_every_shard_is_skipped,
    track_shards,
    worker_info,
)
from ldm.data.stats import SKIP_REASONS, DataStats, NoUsableDataError
from ldm.data.transforms import ImageTransform

# Names that are read from here as well as from their own modules.
__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "DataStats",
    "MissingCaption",
    "NoUsableDataError",
    "Resume",
    "ShardDataset",
    "ShardLoader",
    "ShardSpec",
    "collate_samples",
    "decode_image",
    "expand_shards",
    "node_info",
    "worker_info",
]


class ShardDataset(torch.utils.data.IterableDataset):
    """An IterableDataset over webdataset shards; each pass (`iter`) is built from the stages in
    ldm.data.stages by `pipeline`:

        shard urls (shuffled per epoch | resampled) → split_by_node → split_by_worker   [not when resampled]
        → tar reading → sample shuffle buffer (raw bytes) → decode + transform (skips counted)
        → epoch_length cut

    Samples: {"image": float32 (3, R, R) in [-1, 1], "caption": str, "key": str}, or what `decoder` makes (e.g.
    cached latents); with `buckets`, images keep their aspect ratio (ShardLoader batches them one bucket each).
    """

    def __init__(
        self,
        shards: ShardSpec,
        resolution: int = 64,
        random_crop: bool = False,
        flip_prob: float = 0.0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        missing_caption: MissingCaption = "skip",
        seed: int = 0,
        stats: DataStats | None = None,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        split_nodes: bool = True,
        buckets: AspectRatioBuckets | None = None,
        decoder: SampleDecoder | None = None,
    ) -> None:
        if missing_caption not in ("skip", "empty"):
            raise ValueError(f"missing_caption must be 'skip' or 'empty', got {missing_caption!r}")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1 or None, got {epoch_length}")
        self.spec = shards
        self.urls = expand_shards(shards)
        self.resolution = resolution
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.epoch_length = epoch_length
        self.missing_caption = missing_caption
        self.seed = seed
        # split_nodes=False: every rank reads all shards (e.g. a validation set with fewer shards than ranks).
        self.split_nodes = split_nodes
        # With buckets, images keep their aspect ratio: each is cropped to the bucket nearest its shape.
        self.buckets = buckets
        if decoder is None:
            if transform is None and buckets is not None:
                transform = BucketTransform(buckets, random_crop=random_crop, flip_prob=flip_prob)
            transform = transform or ImageTransform(resolution, random_crop=random_crop, flip_prob=flip_prob)
            draft_size = buckets.max_side if buckets is not None else resolution
            decoder = ImageDecoder(transform, draft_size=draft_size, missing_caption=missing_caption)
        self.decoder = decoder
        self.stats = stats if stats is not None else DataStats(decoder.skip_reasons)
        # The next pass: its epoch (for shuffling seeds) and where it resumes (set_epoch); each pass advances them.
        self.epoch = 0
        self.resume: Resume | None = None
        # Rank as seen by the process that built the dataset. DataLoader workers started with "spawn" have neither
        # the process group nor (under some launchers) RANK/WORLD_SIZE, and would all think they are rank 0.
        self.node = node_info()

    # -- epochs and splitting -----------------------------------------------------------------------------------

    def set_epoch(self, epoch: int, resume: Resume | None = None) -> None:
        """Set the epoch used for shuffling seeds. Called from the main process before workers start: workers that
        are not persistent get a fresh copy each epoch; persistent ones advance their own copy after each pass.

        ``resume``: the next pass continues an interrupted epoch. Resampled streams are drawn afresh (the resume
        step joins their seeds), so a resumed run does not replay the samples the epoch began with; plain
        passes keep their order and skip the samples already trained on."""
        self.epoch = epoch
        self.resume = resume
        if torch.utils.data.get_worker_info() is None:
            rank, world_size = node_info()
            if world_size > 1:  # the process group may have been set up after the dataset was built
                self.node = (rank, world_size)

    def current_node(self) -> tuple[int, int]:
        rank, world_size = node_info()
        if world_size == 1 and self.node[1] > 1:
            return self.node
        return rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # The one place the next pass's epoch and resume position are taken: later passes start their epoch
        # afresh. A generator, so they are taken at the first sample: an iterator made but never read uses none.
        epoch, resume = self.epoch, self.resume
        self.epoch, self.resume = epoch + 1, None
        yield from self.pipeline(epoch, resume)

    def pipeline(self, epoch: int, resume: Resume | None = None) -> Iterator[dict[str, Any]]:
        """One pass: epoch `epoch` of this DataLoader worker (or of this process without workers), continuing an
        interrupted epoch after what `resume` says was trained."""
        state = PassState(self.stats)
        rank, _ = self.current_node()
        worker, num_workers = worker_info()
        # A resumed resampled epoch is drawn afresh (so it does not replay the epoch's start); a plain pass keeps
        # its order and skips what was trained instead.
        salt = "" if resume is None or not self.resampled else f"/resumed-at-step-{resume.step}"
        consumed = 0 if resume is None else resume.consumed(worker, num_workers)

        if self.resampled:
            urls = resampled_shards(self.urls, seed=f"{self.seed}/{epoch}/{rank}/{worker}/shards{salt}")
            # A resampled stream never ends, so "nothing usable" has to be decided on the way.
            check = stop_when_every_shard_is_skipped(self.urls, self.nothing_usable_message)
        else:
            urls = shard_order(self.urls, seed=f"{self.seed}/{epoch}/shards" if self.shuffle else None)
            if self.split_nodes:
                urls = split_by_node(urls, self.node)
            urls = wds.split_by_worker(urls)
            check = None
        samples = wds.tarfile_samples(track_shards(urls, state, check), handler=shard_error_handler(state, self.urls))
        samples = count_raw(samples, state)
        if self.shuffle and self.shuffle_buffer > 1:
            samples = shuffle_samples(samples, self.shuffle_buffer,
                                      seed=f"{self.seed}/{epoch}/{rank}/{worker}/samples{salt}")
        if not self.resampled:
            # Before decoding, so skipping costs reading only. Exact unless skipped samples included bad ones.
            samples = itertools.islice(samples, consumed, None)
        decoded = decode(samples, self.decoder, state, check)
        if not self.resampled:
            decoded = fail_if_nothing_usable(decoded, state, self.nothing_usable_message, num_workers)
        if self.epoch_length is not None:
            decoded = itertools.islice(decoded, max(0, self.samples_per_worker(worker, num_workers) - consumed))
        return decoded

    def samples_per_worker(self, worker: int, num_workers: int) -> int:
        """This worker's share of `epoch_length` (samples per rank), so that all workers together give exactly
        epoch_length samples."""
        assert self.epoch_length is not None
        base, extra = divmod(self.epoch_length, num_workers)
        return base + (1 if worker < extra else 0)

    def nothing_usable_message(self, state: PassState) -> str:
        shards = sorted(set(state.shards))
        return (
            f"no usable samples in shards [{shorten(shards)}] (shard spec {self.spec!r}): read {state.raw} "
            f"samples, skipped {state.skipped}; counts so far {self.stats.as_dict()}. Check that images decode "
            f"and have a .txt caption (missing_caption={self.missing_caption!r})."
        )


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The collate function for datasets that yield whole batches (a module-level function: workers pickle it)."""
    return batch


class ShardLoader:
    """A DataLoader over a ShardDataset that sets the shuffling epoch and fails loudly on an empty epoch.

    Lightning accepts any iterable; `len()` is defined only when the epoch length is known (resampled mode with
    epoch_length), which lets Lightning show progress and schedule validation.
    """

    def __init__(
        self,
        dataset: ShardDataset,
        batch_size: int,
        num_workers: int = 0,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # Not called `dataset`: Lightning would take this object for a DataLoader over an IterableDataset and
        # warn that its length may be wrong (here it is exact).
        self.shard_dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        # With buckets, each worker makes one-bucket batches itself and the DataLoader passes them on.
        bucketed = getattr(dataset, "buckets", None) is not None
        source = BucketBatches(dataset, batch_size, dataset.decoder.collate) if bucketed else dataset
        self.loader = torch.utils.data.DataLoader(
            source,
            batch_size=None if bucketed else batch_size,
            num_workers=num_workers,
            collate_fn=_as_is if bucketed else dataset.decoder.collate,
            pin_memory=pin_memory,
            drop_last=drop_last and not bucketed,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=2 if num_workers > 0 else None,
        )
        self._epoch = 0
        self._resume: Resume | None = None

    def resume_from(self, epoch: int, batches: int, step: int) -> None:
        """A resumed run: the next pass is epoch ``epoch``, of which ``batches`` batches were trained already
        (the data position Lightning does not restore for iterable datasets)."""
        self._epoch = epoch
        self._resume = Resume(batches, self.batch_size, step) if batches > 0 else None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Each pass first gives the dataset its epoch and resume position: this process's dataset takes them,
        # and so do the copies that DataLoader workers make when they start (persistent ones then go on alone).
        resumed = self._resume is not None
        self.shard_dataset.set_epoch(self._epoch, self._resume)
        self._resume = None
        self._epoch += 1
        batches = 0
        for batch in self.loader:
            batches += 1
            yield batch
        if batches == 0 and not resumed:  # a resumed epoch may have had nothing left
            raise NoUsableDataError(self._empty_message())

    def __len__(self) -> int:
        if self.shard_dataset.epoch_length is None:
            raise TypeError("ShardLoader has no length: the number of samples is known only with epoch_length")
        workers = max(1, self.num_workers)
        per_worker = [self.shard_dataset.samples_per_worker(w, workers) for w in range(workers)]
        rounding = math.floor if self.drop_last else math.ceil
        return sum(int(rounding(n / self.batch_size)) for n in per_worker)

    def _empty_message(self) -> str:
        rank, world_size = self.shard_dataset.current_node()
        urls = self.shard_dataset.urls
        message = (
            f"no batches from shard spec {self.shard_dataset.spec!r} ({shorten(urls)}) "
            f"on rank {rank}/{world_size}; "
            f"{self.shard_dataset.stats.as_dict()}."
        )
        if not self.shard_dataset.resampled and self.shard_dataset.split_nodes and len(urls) < world_size:
            message += f" There are fewer shards ({len(urls)}) than ranks ({world_size}): use resampled=True."
        elif self.drop_last:
            message += f" drop_last=True with batch_size={self.batch_size} may drop every (partial) batch."
        return message
