"""Writing webdataset shards: plain tar files of `{key}.{ext}` members, grouped by key.

The layout is img2dataset's: `{key}.png` (or .jpg/.webp) + `{key}.txt` + optional `{key}.json`, members of one
sample adjacent in the archive. We write the tar ourselves rather than through `webdataset.ShardWriter` so that:
  * the bytes are deterministic (fixed mtime/owner), so a rebuild with the same inputs gives identical shards;
  * a shard only gets its final name once it is complete (written as `.tar.tmp`, then renamed), so a build that
    dies half way never leaves a truncated `.tar` that a folder spec would pick up.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

# Extensions webdataset keys are split on: the key is everything before the first dot of the member name.
_FORBIDDEN_KEY_CHARS = (".", "/", "\\")


def _as_bytes(value: bytes | str | dict | list) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")


class TarShardWriter:
    """Writes samples into `{out_dir}/{prefix}-{index:06d}.tar`, `shard_size` samples per shard.

    Usage:
        with TarShardWriter("data/x", prefix="x", shard_size=1000) as w:
            w.write("000001", {"png": png_bytes, "txt": "a caption", "json": {"source": "..."}})
        w.shards  # list of written shard paths
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", shard_size: int = 1000) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if "." in prefix or "/" in prefix:
            raise ValueError(f"shard prefix must not contain '.' or '/': {prefix!r}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.shard_size = shard_size
        self.shards: list[str] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._in_shard = 0
        self._keys: set[str] = set()
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _open_next(self) -> None:
        path = self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp_path = path.with_name(path.name + ".tmp")
        self._tar = tarfile.open(self._tmp_path, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - spans writes
        self._in_shard = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._tmp_path is not None
        final = self._tmp_path.with_name(self._tmp_path.name[: -len(".tmp")])
        os.replace(self._tmp_path, final)
        self.shards.append(str(final))
        logger.debug("wrote %s (%d samples)", final, self._in_shard)
        self._tar = None
        self._tmp_path = None

    def write(self, key: str, files: Mapping[str, bytes | str | dict | list]) -> None:
        """Add one sample; `files` maps extension ("png", "txt", "json") to its content."""
        if not key or any(c in key for c in _FORBIDDEN_KEY_CHARS):
            raise ValueError(f"invalid sample key {key!r}: must be non-empty without '.', '/' or '\\'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if not files:
            raise ValueError(f"sample {key!r} has no files")
        self._keys.add(key)
        if self._tar is None:
            self._open_next()
        assert self._tar is not None
        for ext, value in files.items():
            data = _as_bytes(value)
            info = tarfile.TarInfo(name=f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0  # deterministic bytes: identical inputs give identical shards
            info.mode = 0o644
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self._in_shard += 1
        if self._in_shard >= self.shard_size:
            self._close_current()

    def close(self) -> list[str]:
        self._close_current()
        return list(self.shards)

    def abort(self) -> None:
        """Drop the shard being written (used when the build fails)."""
        if self._tar is not None:
            self._tar.close()
            assert self._tmp_path is not None
            self._tmp_path.unlink(missing_ok=True)
            self._tar = None
            self._tmp_path = None

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
