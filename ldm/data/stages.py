"""The stages of one pass over webdataset shards, as plain generator functions.

A pass is one epoch of one DataLoader worker (or of the main process without workers). ShardDataset.pipeline
chains the stages, webdataset's own where they fit:

    shard_order (shuffled per epoch) → split_by_node → wds.split_by_worker        plain pass
    | resampled_shards (drawn with replacement, forever)                          resampled stream
    → track_shards → wds.tarfile_samples → count_raw → shuffle_samples → (skip what a resumed epoch trained on)
    → decode (bad samples skipped and counted) → (epoch cut) → (one-bucket batches: buckets.BucketBatches)

Each stage takes what it needs as arguments: seeds, counts, and the pass's one PassState, created with the pass,
which records what the pass has read and decoded. From it the "nothing usable" rule is decided exactly: a bad
run of samples never ends a resampled stream, only having read every shard through without a usable sample.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import webdataset as wds

from ldm.data.stats import SKIP_LOG, DataStats, NoUsableDataError

logger = logging.getLogger(__name__)


def node_info() -> tuple[int, int]:
    """(rank, world_size) as webdataset sees it: env RANK/WORLD_SIZE, else torch.distributed, else (0, 1)."""
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    return rank, world_size


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


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
class ShardRead:
    """The first complete read of one shard in a pass: how many samples it held and how many were decoded."""

    raw: int = 0
    decoded: int = 0
    complete: bool = False
    errors: int = 0


@dataclass
class PassState:
    """What one pass has seen; used to tell 'some bad samples' from 'nothing usable'. Skips are counted here (for
    this pass's message) and in the DataStats shared with the other workers."""

    stats: DataStats
    shards: list[str] = field(default_factory=list)
    raw: int = 0
    usable: int = 0
    skipped: int = 0
    # Each shard's first read in this pass, and the read in progress (None: a shard read before, or none).
    first_reads: dict[str, ShardRead] = field(default_factory=dict)
    reading: ShardRead | None = None

    def skip(self, reason: str, key: str, url: str, detail: str) -> None:
        """Count and log (rate-limited) a sample that will not be used, and why."""
        self.skipped += 1
        self.stats.add(reason)
        SKIP_LOG.warn(reason, key, url, detail)

    def every_shard_read_and_skipped(self, urls: Sequence[str]) -> bool:
        """Nothing usable can come any more: every shard has been read to its end, and every sample of those
        reads was decoded and skipped. Only then; not after a run of bad samples, however long, because the next
        one may be good."""
        return self.usable == 0 and all(
            (read := self.first_reads.get(url)) is not None and read.complete and read.decoded == read.raw
            for url in urls
        )


# Called whenever the answer to "is anything usable left?" may have changed; raises NoUsableDataError if not.
UsableCheck = Callable[[PassState], None]


class SampleDecoder(Protocol):
    """Turns one raw sample (its tar members by extension, plus __key__ and __url__) into a training sample, or
    returns None after `state.skip(...)`. `skip_reasons` are what it may skip for (DataStats counts them), and
    `collate` stacks its samples into a batch."""

    skip_reasons: tuple[str, ...]

    def __call__(self, sample: dict[str, Any], state: PassState) -> dict[str, Any] | None: ...

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]: ...


def stop_when_every_shard_is_skipped(urls: Sequence[str], describe: Callable[[PassState], str]) -> UsableCheck:
    """The check of a resampled stream, which never ends by itself: stop exactly when every shard has been read
    through and all it held was skipped."""

    def check(state: PassState) -> None:
        if state.every_shard_read_and_skipped(urls):
            raise NoUsableDataError(describe(state))

    return check


# -- where the shards come from -------------------------------------------------------------------------------


def shard_order(urls: Sequence[str], seed: str | None) -> Iterator[dict[str, str]]:
    """Every shard once, shuffled by `seed` (None: in order). The seed leaves out rank and worker on purpose:
    the splits that follow must partition one order common to all of them."""
    order = list(urls)
    if seed is not None:
        random.Random(seed).shuffle(order)
    for url in order:
        yield {"url": url}


def resampled_shards(urls: Sequence[str], seed: str) -> Iterator[dict[str, str]]:
    """Shards drawn with replacement, forever; `seed` differs per rank and worker (else all would read the same
    shards) and is reproducible per epoch."""
    rng = random.Random(seed)
    while True:
        yield {"url": rng.choice(urls)}


def split_by_node(src: Iterable[dict], node: tuple[int, int]) -> Iterator[dict]:
    """This rank's share of the shards. webdataset finds the rank itself (env, then process group), except in a
    worker started with "spawn", which sees neither: `node`, the rank its parent saw, stands in then."""
    if node_info()[1] > 1 or node[1] == 1:
        return wds.split_by_node(src)
    rank, world_size = node
    return itertools.islice(src, rank, None, world_size)


# -- reading ----------------------------------------------------------------------------------------------------


def track_shards(src: Iterable[dict], state: PassState, check: UsableCheck | None) -> Iterator[dict]:
    """Record each shard the tar reader opens, and when its first read in this pass is complete."""
    for item in src:
        # The tar reader asks for the next shard only once it is done with the previous one.
        _end_read(state, check)
        url = item["url"]
        if url in state.first_reads:
            state.reading = None  # a shard drawn again: its first read already tells what it holds
        else:
            state.reading = state.first_reads[url] = ShardRead()
        state.shards.append(url)
        yield item
    _end_read(state, check)


def _end_read(state: PassState, check: UsableCheck | None) -> None:
    if state.reading is not None:
        state.reading.complete = True
        state.reading = None
        if check is not None:
            check(state)


def shard_error_handler(state: PassState, urls: Sequence[str]) -> Callable[[Exception], bool]:
    """The tar reader's handler: an unreadable shard or malformed entry is counted (as shard_error), logged, and
    read past."""

    def handle(exn: Exception) -> bool:
        # A truncated tar raises twice (reading the cut member, then moving past it): count a shard read once.
        reading = state.reading
        if reading is None or reading.errors == 0:
            state.stats.add("shard_error")
            url = next((a for a in reversed(exn.args) if isinstance(a, str) and a in urls), "?")
            SKIP_LOG.warn("shard_error", "-", url, repr(exn)[:300])
        if reading is not None:
            reading.errors += 1
        return True  # continue with the next entry / shard

    return handle


def count_raw(src: Iterable[dict], state: PassState) -> Iterator[tuple[ShardRead | None, dict]]:
    """Count the samples read, and pair each with its shard's first read (None: a shard read before), so that
    decoding, after the shuffle buffer, can count that read's samples as decoded."""
    for sample in src:
        state.raw += 1
        if state.reading is not None:
            state.reading.raw += 1
        yield state.reading, sample


def shuffle_samples(src: Iterable[Any], buffer_size: int, seed: str) -> Iterator[Any]:
    """Shuffle across shards through a buffer of `buffer_size` raw (still encoded) samples: shuffling before
    decoding keeps the buffer small."""
    rng = random.Random(seed)
    buffer: list[Any] = []
    for sample in src:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


# -- decoding ---------------------------------------------------------------------------------------------------


def decode(src: Iterable[tuple[ShardRead | None, dict]], decoder: SampleDecoder, state: PassState,
           check: UsableCheck | None) -> Iterator[dict[str, Any]]:
    """Decoded samples; the ones the decoder skips are counted and dropped."""
    for read, sample in src:
        decoded = decoder(sample, state)
        if read is not None:
            read.decoded += 1
        if decoded is None:
            if check is not None and read is not None and read.complete:
                check(state)
            continue
        state.usable += 1
        state.stats.add("yielded")
        yield decoded


def fail_if_nothing_usable(src: Iterable[dict], state: PassState, describe: Callable[[PassState], str],
                           num_workers: int) -> Iterator[dict]:
    """At the end of a plain pass (the shards ran out), an error if it read shards but yielded nothing."""
    yield from src
    if state.usable == 0 and state.shards:
        message = describe(state)
        if num_workers <= 1:
            raise NoUsableDataError(message)
        # Another worker may have good shards: ShardLoader raises if the whole loader yields nothing.
        logger.warning("%s (this worker only)", message)
