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
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import webdataset as wds
from PIL import Image

from ldm.data.buckets import AspectRatioBuckets, BucketTransform, batch_by_bucket
from ldm.data.specs import ShardSpec, expand_shards, shorten
from ldm.data.stats import SKIP_LOG, SKIP_REASONS, DataStats, NoUsableDataError
from ldm.data.transforms import ImageTransform

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
MissingCaption = Literal["skip", "empty"]


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def node_info() -> tuple[int, int]:
    """(rank, world_size) as webdataset sees it: env RANK/WORLD_SIZE, else torch.distributed, else (0, 1)."""
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    return rank, world_size


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


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


@dataclass(frozen=True)
class Resume:
    """Where a resumed run continues inside an epoch: `batches` of `batch_size` samples per rank were trained,
    the last optimizer step being `step`."""

    batches: int
    batch_size: int
    step: int

    def consumed(self, worker: int, num_workers: int) -> int:
        """Samples this DataLoader worker had produced (workers hand out batches in turn)."""
        return len(range(worker, self.batches, num_workers)) * self.batch_size


@dataclass
class _Read:
    """The first complete read of one shard in a pass: how many samples it held and how many were decoded."""

    raw: int = 0
    decoded: int = 0
    complete: bool = False
    errors: int = 0


@dataclass
class _Pass:
    """What one pass (one epoch of one worker) has seen; used to tell 'some bad samples' from 'nothing usable'."""

    epoch: int
    resume: Resume | None = None
    shards: list[str] = field(default_factory=list)
    raw: int = 0
    usable: int = 0
    skipped: int = 0
    # Each shard's first read in this pass, and the read in progress (None: a shard read before, or none).
    first_reads: dict[str, _Read] = field(default_factory=dict)
    reading: _Read | None = None

    def every_shard_read_and_skipped(self, urls: Sequence[str]) -> bool:
        """Nothing usable can come any more: every shard has been read to its end, and every sample of those
        reads was decoded and skipped. Only then; not after a run of bad samples, however long, because the next
        one may be good."""
        return self.usable == 0 and all(
            (read := self.first_reads.get(url)) is not None and read.complete and read.decoded == read.raw
            for url in urls
        )


# --------------------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------------------


class ShardDataset(wds.DataPipeline):
    """An IterableDataset over webdataset shards, built as a `webdataset.DataPipeline`:

        shard urls (shuffled per epoch | resampled) → split_by_node → split_by_worker   [not when resampled]
        → tar reading → sample shuffle buffer (raw bytes) → decode + transform (skips counted)
        → epoch_length cut

    Samples: {"image": float32 (3, R, R) in [-1, 1], "caption": str, "key": str}.
    """

    skip_reasons: tuple[str, ...] = SKIP_REASONS  # what DataStats counts for this kind of sample

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
        self.split_nodes = split_nodes
        self.stats = stats if stats is not None else DataStats(self.skip_reasons)
        # With buckets, images keep their aspect ratio: each is cropped to the bucket nearest its shape, and
        # batches are formed here, one bucket per batch (ShardLoader sets bucket_batch_size).
        self.buckets = buckets
        self.bucket_batch_size: int | None = None
        if transform is None and buckets is not None:
            transform = BucketTransform(buckets, random_crop=random_crop, flip_prob=flip_prob)
        self.transform = transform or ImageTransform(resolution, random_crop=random_crop, flip_prob=flip_prob)
        self.draft_size = buckets.max_side if buckets is not None else resolution
        self.epoch = 0
        self.resume: Resume | None = None  # taken by the next pass only
        # Rank as seen by the process that built the dataset. DataLoader workers started with "spawn" have neither
        # the process group nor (under some launchers) RANK/WORLD_SIZE, and would all think they are rank 0.
        self.node = node_info()
        self._pass = _Pass(epoch=0)

        stages: list[Any] = [self._shard_urls]
        if not resampled:
            # split_nodes=False: every rank reads all shards (e.g. a validation set with fewer shards than ranks).
            stages += [self._split_by_node, wds.split_by_worker] if split_nodes else [wds.split_by_worker]
        stages += [self._track_shards, wds.tarfile_to_samples(handler=self._on_shard_error), self._track_raw]
        if shuffle and shuffle_buffer > 1:
            stages.append(self._shuffle_samples)
        if not resampled:
            stages.append(self._skip_consumed)
        stages.append(self._decode)
        if epoch_length is not None:
            stages.append(self._cut_epoch)
        if buckets is not None:
            stages.append(self._batch_by_bucket)
        super().__init__(*stages)

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

    def _shard_urls(self) -> Iterator[dict[str, str]]:
        epoch = self.epoch
        self.epoch += 1
        self._pass = _Pass(epoch=epoch, resume=self.resume)
        self.resume = None
        if self.resampled:
            rank, _ = self.current_node()
            worker, _ = worker_info()
            # Distinct per rank and worker (else all would read the same shards), reproducible per epoch.
            rng = random.Random(f"{self.seed}/{epoch}/{rank}/{worker}/shards{self._resume_salt()}")
            return ({"url": rng.choice(self.urls)} for _ in itertools.count())
        order = list(self.urls)
        if self.shuffle:
            # Same permutation on every rank and worker: the splits below must partition one common order.
            random.Random(f"{self.seed}/{epoch}/shards").shuffle(order)
        return ({"url": url} for url in order)

    def _split_by_node(self, src: Iterable[dict]) -> Iterator[dict]:
        if node_info()[1] > 1 or self.node[1] == 1:
            return wds.split_by_node(src)  # webdataset finds the rank itself (env, then process group)
        rank, world_size = self.node  # a spawn-started worker: use the rank its parent saw
        return itertools.islice(src, rank, None, world_size)

    # -- reading ------------------------------------------------------------------------------------------------

    def _track_shards(self, src: Iterable[dict]) -> Iterator[dict]:
        state = self._pass
        for item in src:
            # The tar reader asks for the next shard only once it is done with the previous one.
            self._end_read(state)
            url = item["url"]
            if url in state.first_reads:
                state.reading = None  # a shard drawn again: its first read already tells what it holds
            else:
                state.reading = state.first_reads[url] = _Read()
            state.shards.append(url)
            yield item
        self._end_read(state)

    def _end_read(self, state: _Pass) -> None:
        if state.reading is not None:
            state.reading.complete = True
            state.reading = None
            self._check_usable(state)

    def _on_shard_error(self, exn: Exception) -> bool:
        # A truncated tar raises twice (reading the cut member, then moving past it): count a shard read once.
        reading = self._pass.reading
        if reading is None or reading.errors == 0:
            self.stats.add("shard_error")
            url = next((a for a in reversed(exn.args) if isinstance(a, str) and a in self.urls), "?")
            SKIP_LOG.warn("shard_error", "-", url, repr(exn)[:300])
        if reading is not None:
            reading.errors += 1
        return True  # continue with the next entry / shard

    def _track_raw(self, src: Iterable[dict]) -> Iterator[dict]:
        state = self._pass
        for sample in src:
            state.raw += 1
            if state.reading is not None:
                state.reading.raw += 1
                sample["__read__"] = state.reading  # so that decoding can count this read's samples
            yield sample

    def _shuffle_samples(self, src: Iterable[dict]) -> Iterator[dict]:
        # A buffer of raw (still encoded) samples: shuffling before decoding keeps the buffer small.
        rank, _ = self.current_node()
        worker, _ = worker_info()
        salt = self._resume_salt() if self.resampled else ""  # a plain pass keeps its order (and skips)
        rng = random.Random(f"{self.seed}/{self._pass.epoch}/{rank}/{worker}/samples{salt}")
        buffer: list[dict] = []
        for sample in src:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _resume_salt(self) -> str:
        resume = self._pass.resume
        return "" if resume is None else f"/resumed-at-step-{resume.step}"

    def _skip_consumed(self, src: Iterable[dict]) -> Iterator[dict]:
        # Before decoding, so skipping costs reading only. Exact unless skipped samples included bad ones.
        resume = self._pass.resume
        n = 0 if resume is None else resume.consumed(*worker_info())
        return itertools.islice(src, n, None)

    def _skip(self, reason: str, key: str, url: str, detail: str) -> None:
        self._pass.skipped += 1
        self.stats.add(reason)
        SKIP_LOG.warn(reason, key, url, detail)

    def _check_usable(self, state: _Pass) -> None:
        # A resampled stream never ends, so "nothing usable" has to be decided on the way: exactly when every
        # shard has been read through and all it held was skipped.
        if self.resampled and state.every_shard_read_and_skipped(self.urls):
            raise NoUsableDataError(self._nothing_usable_message(state))

    def _decode(self, src: Iterable[dict]) -> Iterator[dict[str, Any]]:
        state = self._pass
        for sample in src:
            read = sample.pop("__read__", None)
            decoded = self._decode_sample(sample)
            if read is not None:
                read.decoded += 1
            if decoded is None:
                if read is not None and read.complete:
                    self._check_usable(state)
                continue
            state.usable += 1
            self.stats.add("yielded")
            yield decoded

        # Only reached when the shards ran out (not resampled).
        if state.usable == 0 and state.shards:
            _, num_workers = worker_info()
            message = self._nothing_usable_message(state)
            if num_workers <= 1:
                raise NoUsableDataError(message)
            # Another worker may have good shards: ShardLoader raises if the whole loader yields nothing.
            logger.warning("%s (this worker only)", message)

    def _decode_sample(self, sample: dict) -> dict[str, Any] | None:
        """{"image", "caption", "key"}, or None after counting and logging why the sample is skipped."""
        key = str(sample.get("__key__", "?"))
        url = str(sample.get("__url__", "?"))
        data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if data is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            self._skip("no_image", key, url, f"members {members}")
            return None
        raw_caption = sample.get("txt")
        caption = raw_caption.decode("utf-8", errors="replace").strip() if raw_caption is not None else ""
        if not caption:
            if self.missing_caption == "skip":
                self._skip("no_caption", key, url, "no .txt" if raw_caption is None else "empty .txt")
                return None
            self.stats.add("empty_caption")
        try:
            image = self.transform(decode_image(data, draft_size=self.draft_size))
        except Exception as exn:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
            self._skip("corrupt_image", key, url, repr(exn)[:200])
            return None
        return {"image": image, "caption": caption, "key": key}

    def _cut_epoch(self, src: Iterable[dict]) -> Iterator[dict]:
        worker, num_workers = worker_info()
        resume = self._pass.resume
        done = 0 if resume is None else resume.consumed(worker, num_workers)
        return itertools.islice(src, max(0, self.samples_per_worker(worker, num_workers) - done))

    def _batch_by_bucket(self, src: Iterable[dict]) -> Iterator[dict]:
        if self.bucket_batch_size is None:
            raise RuntimeError("a bucketed ShardDataset batches itself: read it through a ShardLoader")
        return batch_by_bucket(src, self.bucket_batch_size, collate_samples)

    def samples_per_worker(self, worker: int, num_workers: int) -> int:
        """This worker's share of `epoch_length` (samples per rank), so that all workers together give exactly
        epoch_length samples."""
        assert self.epoch_length is not None
        base, extra = divmod(self.epoch_length, num_workers)
        return base + (1 if worker < extra else 0)

    def _nothing_usable_message(self, state: _Pass) -> str:
        shards = sorted(set(state.shards))
        return (
            f"no usable samples in shards [{shorten(shards)}] (shard spec {self.spec!r}): read {state.raw} "
            f"samples, skipped {state.skipped}; counts so far {self.stats.as_dict()}. Check that images decode "
            f"and have a .txt caption (missing_caption={self.missing_caption!r})."
        )


# --------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """[{"image": (3,R,R), "caption": str, "key": str}, ...] → {"image": (B,3,R,R), "caption": [B], "key": [B]}:
    tensors are stacked, other values listed (whatever the fields, e.g. cached latents)."""
    return {
        name: torch.stack([s[name] for s in samples]) if isinstance(value, torch.Tensor) else [s[name] for s in samples]
        for name, value in samples[0].items()
    }


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
        bucketed = getattr(dataset, "buckets", None) is not None
        if bucketed:
            dataset.bucket_batch_size = batch_size  # the dataset makes one-bucket batches itself
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None if bucketed else batch_size,
            num_workers=num_workers,
            collate_fn=_as_is if bucketed else getattr(dataset, "collate_fn", collate_samples),
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
        resumed = self._resume is not None
        self.shard_dataset.set_epoch(self._epoch, self._resume)
        self._resume = None
        self._epoch += 1
        batches = 0
        try:
            for batch in self.loader:
                # Taken by now (by this process's pass, or by the workers' copies of the dataset): later passes,
                # e.g. of workers started afresh each epoch, begin at their epoch's start.
                self.shard_dataset.resume = None
                batches += 1
                yield batch
        finally:
            self.shard_dataset.resume = None
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
