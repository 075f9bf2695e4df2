"""How Lightning writes and reads checkpoint files: atomically, and never unpickling code.

Lightning's own TorchCheckpointIO serialises the whole checkpoint into memory first (a second copy of
weights, EMA and optimizer state) and then moves a temporary file from $TMPDIR into place; across file systems
(node-local /tmp → shared checkpoint storage) that move is a copy, so a job killed during it leaves a
truncated `last.ckpt`. Here the checkpoint streams into a temporary file next to its destination, is flushed
to disk, and replaces the destination with one `os.replace` (atomic on POSIX): whenever the process dies,
the path holds either the previous checkpoint or the new one, whole.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ldm.weights_io import CheckpointError, describe_load_error, refers_to_code

log = logging.getLogger(__name__)

_REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "http://", "https://", "hdfs://")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the destination's folder, fsync, then os.replace into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some file systems do not fsync folders; the replace is still atomic
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic writes (see the module docstring); reads with ``torch.load(weights_only=True)`` whatever the
    caller asks, so that resuming from a checkpoint of unknown origin cannot run code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if str(path).startswith(_REMOTE_PREFIXES):  # object stores: Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # UnpicklingError (code in the pickle), zip errors, truncated files
            why = ("it holds Python objects other than tensors, which could run code on load" if refers_to_code(e)
                   else "not a torch checkpoint, or cut short")
            raise CheckpointError(f"cannot resume from {path}: {why} ({describe_load_error(e)}; checkpoints are "
                                  "read with weights_only=True: tensors and plain containers only)") from e
