"""The manifest of a built dataset folder (the emoji and shapes builders).

manifest.json records the builder's options and the size of every file it wrote. It is written last and
atomically, so its presence means the build finished; a second build with the same options over intact files
writes nothing, and one with other options first removes the shards of the previous build.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"

logger = logging.getLogger(__name__)


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a finished build in out_dir, or None."""
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_manifest(out_dir: Path, record: dict[str, Any]) -> None:
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST)


def is_complete(out_dir: Path, manifest: dict[str, Any] | None, options: dict[str, Any]) -> bool:
    """Whether the build the manifest describes was made with these options and its files are intact."""
    if manifest is None or manifest.get("options") != options:
        return False
    files: dict[str, int] = manifest.get("files", {})
    return bool(files) and all(
        (out_dir / name).is_file() and (out_dir / name).stat().st_size == size for name, size in files.items()
    )


def finished_build(out_dir: Path, options: dict[str, Any], force: bool, what: str) -> list[str] | None:
    """The training shards of a finished build of ``what`` in out_dir with these options, or None when it must be
    built (again): with ``force``, other options, or files missing or changed."""
    manifest = read_manifest(out_dir)
    if force or manifest is None or not is_complete(out_dir, manifest, options):
        return None
    logger.info("%s shards in %s are up to date (%d samples)", what, out_dir, manifest["count"])
    return [str(out_dir / name) for name in manifest["shards"]]


def remove_previous_build(out_dir: Path, shard_sets: Iterable[tuple[Path, str]], extra: Iterable[str] = ()) -> None:
    """Delete the manifest and the builder's own shards, ``<prefix>-NNNNN.tar`` in each (folder, prefix), and
    the ``extra`` file names in those folders.

    Only the builder's own file names: the folder may hold other things, but stale shards of another build must
    go, since a folder shard spec would read them too."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for folder, prefix in shard_sets:
        for pattern in (f"{prefix}-[0-9]*.tar", f"{prefix}-[0-9]*.tar.tmp"):
            for path in folder.glob(pattern):
                path.unlink()
        for name in extra:
            (folder / name).unlink(missing_ok=True)
