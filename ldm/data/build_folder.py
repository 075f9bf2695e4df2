"""Shards from a folder of images with same-name caption files.

    python -m ldm.data.build_folder SRC OUT [--shard-size 1000] [--prefix data] [--allow-empty-captions]

SRC is searched recursively: `cats/001.jpg` takes its caption from `cats/001.txt`. JPEG, PNG and WebP files are
stored as they are (no re-encoding, no quality loss); other formats Pillow reads (BMP, GIF, TIFF) are converted to
PNG. Images without a caption are skipped with a warning (or kept with "" under --allow-empty-captions); files
Pillow cannot read are skipped with a warning. Keys are sequential; the source path is kept in `{key}.json`.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ldm.data.writer import TarShardWriter

logger = logging.getLogger(__name__)

# Stored as-is, under the extension the reader looks for.
STORED_FORMATS: dict[str, str] = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
CONVERTED_FORMATS: frozenset[str] = frozenset({".bmp", ".gif", ".tif", ".tiff"})
_MAX_WARNINGS = 20  # per kind; a folder of 100k uncaptioned images should not print 100k lines


class _Warnings:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def warn(self, kind: str, message: str, *args: object) -> None:
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n <= _MAX_WARNINGS:
            logger.warning(message, *args)
        if n == _MAX_WARNINGS:
            logger.warning("further %r warnings are only counted", kind)


def _read_image(path: Path) -> tuple[bytes, str]:
    """Return (bytes, extension) for the shard, after checking that Pillow decodes the file completely."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes everything: truncated or corrupt files raise here, not in training
        suffix = path.suffix.lower()
        if suffix in STORED_FORMATS:
            return data, STORED_FORMATS[suffix]
        buffer = io.BytesIO()
        converted = image if image.mode in ("RGB", "RGBA", "L", "LA") else image.convert("RGBA")
        converted.save(buffer, format="PNG")
        return buffer.getvalue(), "png"


def build_folder_shards(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
    prefix: str = "data",
    allow_empty_captions: bool = False,
) -> list[str]:
    """Write shards `{out_dir}/{prefix}-NNNNNN.tar` from the images under `src`; returns their paths."""
    source = Path(src)
    if not source.is_dir():
        raise NotADirectoryError(f"image folder {source} does not exist")
    suffixes = set(STORED_FORMATS) | CONVERTED_FORMATS
    images = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(sorted(suffixes))}) under {source}")

    out = Path(out_dir)
    previous = set(out.glob(f"{prefix}-[0-9]*.tar")) if out.is_dir() else set()
    warnings = _Warnings()
    written = 0
    with TarShardWriter(out_dir, prefix=prefix, shard_size=shard_size) as writer:
        for path in images:
            relative = path.relative_to(source).as_posix()
            caption_path = path.with_suffix(".txt")
            has_caption_file = caption_path.is_file()
            caption = caption_path.read_text(encoding="utf-8", errors="replace").strip() if has_caption_file else ""
            if not caption:
                reason = "has an empty caption file" if has_caption_file else "has no caption file"
                if not allow_empty_captions:
                    warnings.warn("no_caption", "skipping %s: it %s %s (use --allow-empty-captions to keep it)",
                                  relative, reason, caption_path.name)
                    continue
                warnings.warn("empty_caption", "%s %s %s: kept with an empty caption", relative, reason,
                              caption_path.name)
            try:
                data, extension = _read_image(path)
            except Exception as exn:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
                warnings.warn("unreadable", "skipping %s: not a readable image (%s)", relative, repr(exn)[:200])
                continue
            writer.write(f"{written:09d}", {extension: data, "txt": caption, "json": {"path": relative}})
            written += 1

    # A previous, larger build would leave extra shards that a folder spec would read along with the new ones.
    stale = sorted(previous - {Path(p) for p in writer.shards})
    for path in stale:
        path.unlink()
    if stale:
        logger.info("removed %d shards of a previous build from %s", len(stale), out)
    skipped = {k: v for k, v in warnings.counts.items() if k != "empty_caption"}
    logger.info("wrote %d of %d images into %d shards in %s; skipped %s", written, len(images),
                len(writer.shards), out_dir, skipped or "none")
    if written == 0:
        raise RuntimeError(f"no usable image under {source}: skipped {skipped}")
    return writer.shards


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="folder of images with same-name .txt captions")
    parser.add_argument("out", help="output folder for the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--prefix", default="data", help="shard file name prefix")
    parser.add_argument("--allow-empty-captions", action="store_true", help='keep uncaptioned images with ""')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shards = build_folder_shards(args.src, args.out, shard_size=args.shard_size, prefix=args.prefix,
                                 allow_empty_captions=args.allow_empty_captions)
    print(f"{len(shards)} shards in {args.out}")


if __name__ == "__main__":
    main()
