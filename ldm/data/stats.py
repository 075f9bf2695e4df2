"""Counting and reporting skipped samples: the DataStats counters shared with DataLoader workers, the
rate-limited skip warnings, and the one error for a shard set with nothing usable in it.

Bad data never ends a run: a sample that cannot be used is skipped, counted and logged with its key and shard.
Only a shard set that yields nothing usable at all is an error.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.context
import time
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Why image samples are skipped; other sample kinds name their own (e.g. cached latents: ldm.data.latents).
SKIP_REASONS: tuple[str, ...] = ("corrupt_image", "no_image", "no_caption", "shard_error")


class NoUsableDataError(RuntimeError):
    """A shard set that yields nothing to train on (every sample skipped, or no shard readable)."""


class DataStats:
    """Counts of yielded and skipped samples, shared by the DataLoader workers of one process.

    The counts live in shared memory so that the training process sees what its workers skipped (with fork or
    spawn workers). Each rank has its own; reduce across ranks if a global figure is wanted.
      yielded        samples that reached the model
      empty_caption  samples kept with caption "" (missing_caption="empty")
      skipped[r]     samples dropped, by reason (``reasons``; for images: corrupt_image, no_image, no_caption,
                     shard_error, an unreadable
                     shard or malformed tar entry, counted once per error)

    One row of counters per writer (row 0: the main process, row 1 + k: worker k), summed when read: each row has
    a single writer, so no lock is needed, and a lock is what could not be sent to "spawn" workers from a
    process whose default start method is "fork".
    """

    max_rows: int = 65  # the main process and 64 workers; more workers share rows (counts may then undercount)

    def __init__(self, reasons: Sequence[str] = SKIP_REASONS) -> None:
        self.reasons = tuple(reasons)
        self._fields = ("yielded", "empty_caption") + self.reasons
        self._counts = multiprocessing.RawArray(ctypes.c_int64, self.max_rows * len(self._fields))

    def add(self, name: str, n: int = 1) -> None:
        info = torch.utils.data.get_worker_info()
        row = 0 if info is None else 1 + info.id % (self.max_rows - 1)
        self._counts[row * len(self._fields) + self._fields.index(name)] += n

    def _get(self, name: str) -> int:
        index = self._fields.index(name)
        return int(sum(self._counts[index :: len(self._fields)]))

    @property
    def yielded(self) -> int:
        return self._get("yielded")

    @property
    def empty_caption(self) -> int:
        return self._get("empty_caption")

    @property
    def skipped(self) -> dict[str, int]:
        return {reason: self._get(reason) for reason in self.reasons}

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, int]:
        """Flat counts, e.g. for `LightningModule.log_dict`: {"yielded": .., "skipped/corrupt_image": .., ...}."""
        out = {"yielded": self.yielded, "empty_caption": self.empty_caption}
        out.update({f"skipped/{reason}": n for reason, n in self.skipped.items()})
        return out

    def reset(self) -> None:
        """Zero the counts (call while no worker is running)."""
        ctypes.memset(self._counts, 0, ctypes.sizeof(self._counts))

    def __repr__(self) -> str:
        return f"DataStats(yielded={self.yielded}, empty_caption={self.empty_caption}, skipped={self.skipped})"

    # Shared memory can only travel to a child process while it is being spawned. Any other pickling (e.g. a
    # datamodule sent through ddp_spawn after use) gets a private copy of the current counts instead of failing.
    def __getstate__(self) -> dict[str, Any]:
        if multiprocessing.context.get_spawning_popen() is not None:
            return {"reasons": self.reasons, "shared": self._counts}
        return {"reasons": self.reasons, "values": list(self._counts[:])}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.reasons = state["reasons"]
        self._fields = ("yielded", "empty_caption") + self.reasons
        if "shared" in state:
            self._counts = state["shared"]
        else:
            self._counts = multiprocessing.RawArray(ctypes.c_int64, self.max_rows * len(self._fields))
            self._counts[:] = state["values"]


class SkipLog:
    """Per-process rate limit for skip warnings: the first few of each reason in full, then a summary at most
    every `interval` seconds, so a dataset with 5% broken files does not drown the training log."""

    first: int = 10
    interval: float = 60.0

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.last: dict[str, float] = {}

    def warn(self, reason: str, key: str, url: str, detail: str) -> None:
        n = self.seen[reason] = self.seen.get(reason, 0) + 1
        now = time.monotonic()
        if n <= self.first:
            logger.warning("skipped sample %r from %s: %s (%s)", key, url, reason, detail)
            if n == self.first:
                logger.warning("further %r skips are summarised at most every %.0f s", reason, self.interval)
            self.last[reason] = now
        elif now - self.last.get(reason, 0.0) >= self.interval:
            logger.warning("%d samples skipped for %r in this process so far; latest %r from %s (%s)",
                           n, reason, key, url, detail)
            self.last[reason] = now


# One per process, whatever reads the shards: the rate limit is on what the training log shows.
SKIP_LOG = SkipLog()
