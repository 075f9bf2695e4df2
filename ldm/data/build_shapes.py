"""The built-in shapes dataset: coloured circles, squares and triangles, captioned "a red circle and a blue square".

    python -m ldm.data.build_shapes --out data/shapes [--size 32] [--count 20000] [--seed 0]
        [--heldout "red triangle" "green circle" "blue square"]

Each image holds one or two objects, each a colour–shape combination drawn at a random size and position on a
black background, never overlapping. Captions name the objects in a random order, joined by "and". A share of
captions leave the colours out ("a circle and a square", "two circles"), so that a prompt without colour words
means "any colour" (what negative prompts act on). The held-out combinations are never drawn in the training or
validation images: only the held-out set shows them.

Every sample stores its ground truth, so evaluation never re-derives it:
    {key}.png        the image (RGB)
    {key}.txt        the caption
    {key}.json       {"caption", "coloured", "objects": [{"colour", "shape", "bbox": [x0, y0, x1, y1]}, ...]}
                     in caption order; bbox in pixels, end-exclusive
    {key}.mask.png   8-bit mask: 0 = background, i + 1 = pixels of objects[i] (coverage ≥ 1/2)

Output in --out:
    shapes-000000.tar ...              training shards (seen combinations only)
    val/shapes-val-*.tar               validation images of the same distribution, drawn from another seed
    heldout/shapes-heldout-*.tar       images with at least one held-out combination, captions always coloured
    manifest.json                      options (vocabulary, held-out combinations), counts, files; a later call
                                       with the same options does nothing

Deterministic from --seed. Objects are drawn at `supersample`× the size and box-filtered down, so edge pixels
mix the object's colour with the background in proportion to the area covered (the mask takes the pixels more
than half covered).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ldm.data.manifest import MANIFEST, finished_build, read_manifest, remove_previous_build, write_manifest
from ldm.data.specs import expand_shards
from ldm.data.writer import TarShardWriter

logger = logging.getLogger(__name__)

# Bump when the drawing or the sample format changes, so that cached builds are redone.
FORMAT_VERSION = 1
SPLITS = {"train": ("", "shapes"), "val": ("val", "shapes-val"), "heldout": ("heldout", "shapes-heldout")}

# Saturated colours far apart in hue, on black: every pair is > 60 ΔE (CIELAB) apart and from the background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 230),
    "yellow": (240, 200, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
# One combination per shape and a different colour each, so every colour and every shape still occurs in training.
DEFAULT_HELDOUT: tuple[str, ...] = ("red triangle", "green circle", "blue square")
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end-exclusive

    @property
    def combo(self) -> str:
        return f"{self.colour} {self.shape}"


def parse_combo(text: str, colours: Sequence[str] = tuple(COLOURS), shapes: Sequence[str] = SHAPES) -> tuple[str, str]:
    """'red triangle' → ('red', 'triangle'), checked against the vocabulary."""
    words = text.split()
    if len(words) != 2 or words[0] not in colours or words[1] not in shapes:
        raise ValueError(f"heldout: {text!r} is not '<colour> <shape>' with a colour of {list(colours)} and a "
                         f"shape of {list(shapes)}")
    return words[0], words[1]


# ---------------------------------------------------------------------------------------------- captions


def object_phrase(obj: ShapeObject, coloured: bool = True) -> str:
    return f"a {obj.colour} {obj.shape}" if coloured else f"a {obj.shape}"


def caption(objects: Sequence[ShapeObject], coloured: bool = True) -> str:
    """'a red circle', 'a red circle and a blue square'; uncoloured: 'a circle and a square', 'two circles'."""
    if not coloured and len(objects) == 2 and objects[0].shape == objects[1].shape:
        return f"two {_PLURALS.get(objects[0].shape, objects[0].shape + 's')}"
    return " and ".join(object_phrase(o, coloured) for o in objects)


# ---------------------------------------------------------------------------------------------- drawing


def _coverage(shape: str, bbox: tuple[int, int, int, int], size: int, supersample: int) -> np.ndarray:
    """Fraction of each pixel that the shape covers, (size, size) float32 in [0, 1]."""
    s = supersample
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * s for v in bbox)
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif shape == "triangle":  # upright: apex at the top centre, base along the bottom of the box
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    # Box filter: the mean over each s×s block is the covered fraction of that pixel.
    return np.asarray(canvas, dtype=np.float32).reshape(size, s, size, s).mean(axis=(1, 3)) / 255.0


def draw_scene(
    objects: Sequence[ShapeObject],
    size: int,
    supersample: int = 4,
    colours: dict[str, tuple[int, int, int]] | None = None,
    background: tuple[int, int, int] = BACKGROUND,
) -> tuple[np.ndarray, np.ndarray]:
    """The image (size, size, 3) uint8 and its mask (size, size) uint8: 0 background, i + 1 for objects[i]."""
    colours = COLOURS if colours is None else colours
    image = np.broadcast_to(np.asarray(background, np.float32), (size, size, 3)).copy()
    mask = np.zeros((size, size), np.uint8)
    for i, obj in enumerate(objects):
        cover = _coverage(obj.shape, obj.bbox, size, supersample)[..., None]
        image = image * (1.0 - cover) + np.asarray(colours[obj.colour], np.float32) * cover
        mask[cover[..., 0] >= 0.5] = i + 1
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def _boxes_apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def place_objects(
    rng: np.random.Generator, combos: Sequence[tuple[str, str]], size: int, min_side: int, max_side: int,
    margin: int = 1, gap: int = 2,
) -> list[ShapeObject]:
    """Random sides in [min_side, max_side] and positions inside the margin, boxes at least `gap` pixels apart."""
    for _ in range(1000):
        objects: list[ShapeObject] = []
        for colour, shape in combos:
            side = int(rng.integers(min_side, max_side + 1))
            high = size - margin - side
            x0, y0 = (int(v) for v in rng.integers(margin, high + 1, size=2))
            box = (x0, y0, x0 + side, y0 + side)
            if any(not _boxes_apart(box, o.bbox, gap) for o in objects):
                break
            objects.append(ShapeObject(colour, shape, box))
        else:
            return objects
    raise RuntimeError(f"could not place {len(combos)} objects of sides {min_side}-{max_side} px in {size} px")


# ---------------------------------------------------------------------------------------------- building


@dataclass(frozen=True)
class ShapesOptions:
    size: int = 32
    count: int = 20000
    val_count: int = 256
    heldout_count: int = 256
    shard_size: int = 1000
    seed: int = 0
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    heldout: tuple[str, ...] = DEFAULT_HELDOUT
    two_object_prob: float = 0.6
    uncoloured_caption_prob: float = 0.2
    min_side: float = 0.28  # object sides as a fraction of the image side
    max_side: float = 0.47
    supersample: int = 4

    def check(self) -> None:
        unknown = [c for c in self.colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"colours: unknown {unknown}; the palette has {list(COLOURS)}")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"shapes: unknown {unknown}; choose from {list(SHAPES)}")
        for combo in self.heldout:
            parse_combo(combo, self.colours, self.shapes)
        if len(self.seen_combos()) < 2:
            raise ValueError(f"heldout: {list(self.heldout)} leave fewer than 2 combinations to train on")
        if not 0 < self.min_side <= self.max_side < 0.5:
            raise ValueError(f"min_side, max_side: need 0 < min_side <= max_side < 0.5 (two objects side by side), "
                             f"got {self.min_side}, {self.max_side}")
        if round(self.min_side * self.size) < 4:
            raise ValueError(f"min_side: objects of {round(self.min_side * self.size)} px at size {self.size} are "
                             "too small to tell apart (4 px at least)")
        for name in ("two_object_prob", "uncoloured_caption_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("count", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def all_combos(self) -> list[tuple[str, str]]:
        return [(c, s) for c in self.colours for s in self.shapes]

    def heldout_combos(self) -> list[tuple[str, str]]:
        return [parse_combo(c, self.colours, self.shapes) for c in self.heldout]

    def seen_combos(self) -> list[tuple[str, str]]:
        held = set(self.heldout_combos())
        return [c for c in self.all_combos() if c not in held]

    def side_range(self) -> tuple[int, int]:
        return max(4, round(self.min_side * self.size)), round(self.max_side * self.size)


def sample_scene(rng: np.random.Generator, options: ShapesOptions, split: str) -> tuple[list[ShapeObject], bool]:
    """Objects (in caption order) and whether the caption names their colours."""
    seen, held = options.seen_combos(), options.heldout_combos()
    two = rng.random() < options.two_object_prob
    if split == "heldout":
        first = held[rng.integers(len(held))]
        pool = [c for c in options.all_combos() if c != first]
        combos = [first, pool[rng.integers(len(pool))]] if two else [first]
        rng.shuffle(combos)  # the held-out object is not always named first
        coloured = True  # without colours the caption says nothing about the held-out combination
    else:
        first = seen[rng.integers(len(seen))]
        pool = [c for c in seen if c != first]  # two identical objects would make an ambiguous caption
        combos = [first, pool[rng.integers(len(pool))]] if two else [first]
        coloured = bool(rng.random() >= options.uncoloured_caption_prob)
    low, high = options.side_range()
    return place_objects(rng, combos, options.size, low, high), coloured


def _png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _write_split(out: Path, split: str, count: int, options: ShapesOptions) -> tuple[list[str], list[str]]:
    folder, prefix = SPLITS[split]
    rng = np.random.default_rng([options.seed, list(SPLITS).index(split)])
    captions = []
    with TarShardWriter(out / folder, prefix=prefix, shard_size=options.shard_size) as writer:
        for index in range(count):
            objects, coloured = sample_scene(rng, options, split)
            image, mask = draw_scene(objects, options.size, options.supersample)
            text = caption(objects, coloured)
            record = {"caption": text, "coloured": coloured,
                      "objects": [{**asdict(o), "bbox": list(o.bbox)} for o in objects]}
            writer.write(f"{split}{index:07d}", {"png": _png(image, "RGB"), "txt": text, "json": record,
                                                 "mask.png": _png(mask, "L")})
            captions.append(text)
    return [os.path.relpath(p, out) for p in writer.shards], captions


def build_shapes_shards(out_dir: str | os.PathLike, force: bool = False, **kwargs: Any) -> list[str]:
    """Build (or find up to date) the shapes shards in `out_dir`; returns the training shard paths.

    kwargs: the fields of `ShapesOptions` (lists are accepted for the tuple fields). Idempotent: with the same
    options and intact files nothing is written (see manifest.json).
    """
    fields = ShapesOptions.__dataclass_fields__
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"unknown shapes build options {unknown}; known: {sorted(fields)}")
    # Sequences (lists, Hydra's ListConfig) become tuples: the options are frozen and compared with the manifest.
    options = ShapesOptions(**{k: v if isinstance(v, (str, int, float)) else tuple(v) for k, v in kwargs.items()})
    options.check()
    recorded = {"format_version": FORMAT_VERSION, **asdict(options)}
    recorded = json.loads(json.dumps(recorded))  # tuples → lists, as the manifest reads back
    out = Path(out_dir)
    if (finished := finished_build(out, recorded, force, "shapes")) is not None:
        return finished

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    remove_previous_build(out, [(out / folder, prefix) for folder, prefix in SPLITS.values()])
    shards, captions = _write_split(out, "train", options.count, options)
    val_shards, _ = _write_split(out, "val", options.val_count, options) if options.val_count else ([], [])
    held_shards, _ = (_write_split(out, "heldout", options.heldout_count, options)
                      if options.heldout_count and options.heldout else ([], []))
    everything = shards + val_shards + held_shards
    record = {
        "options": recorded,
        "count": options.count,
        "val_count": options.val_count if val_shards else 0,
        "heldout_count": options.heldout_count if held_shards else 0,
        "seen_combos": [f"{c} {s}" for c, s in options.seen_combos()],
        "heldout_combos": [f"{c} {s}" for c, s in options.heldout_combos()],
        "colour_values": {c: list(COLOURS[c]) for c in options.colours},
        "background": list(BACKGROUND),
        "distinct_captions": len(set(captions)),
        "shards": shards,
        "val_shards": val_shards,
        "heldout_shards": held_shards,
        "files": {name: (out / name).stat().st_size for name in everything},
        "seconds": round(time.perf_counter() - start, 2),
    }
    # Written last and atomically: its presence means the build finished.
    write_manifest(out, record)
    logger.info("built %d shapes images (+%d val, +%d held out) in %s, %.1f s", options.count,
                record["val_count"], record["heldout_count"], out, record["seconds"])
    return [str(out / name) for name in shards]


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class ShapesSample:
    key: str
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8: 0 background, i + 1 object i
    caption: str
    coloured: bool
    objects: list[ShapeObject]


def read_shapes_samples(shards: str | os.PathLike | Sequence[str | os.PathLike],
                        limit: int | None = None) -> Iterator[ShapesSample]:
    """The samples of shapes shards with their ground truth, in shard order (a folder means its *.tar)."""
    yielded = 0
    for url in expand_shards(shards):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(url) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                file = tar.extractfile(info)
                if file is not None:
                    members.setdefault(key, {})[ext] = file.read()
        for key, files in members.items():
            if limit is not None and yielded >= limit:
                return
            record = json.loads(files["json"])
            yield ShapesSample(
                key=key,
                image=np.array(Image.open(io.BytesIO(files["png"])).convert("RGB")),
                mask=np.array(Image.open(io.BytesIO(files["mask.png"]))),
                caption=files["txt"].decode("utf-8"),
                coloured=bool(record["coloured"]),
                objects=[ShapeObject(o["colour"], o["shape"], tuple(o["bbox"])) for o in record["objects"]],
            )
            yielded += 1


def split_shards(out_dir: str | os.PathLike, split: str) -> list[str]:
    """Paths of one split ("train", "val", "heldout") of a finished build."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST} in {out_dir}: build the shapes shards first")
    key = {"train": "shards", "val": "val_shards", "heldout": "heldout_shards"}[split]
    return [str(Path(out_dir) / name) for name in manifest[key]]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = ShapesOptions()
    parser.add_argument("--out", default="data/shapes", help="output folder")
    parser.add_argument("--size", type=int, default=defaults.size, help="image side in pixels")
    parser.add_argument("--count", type=int, default=defaults.count, help="training images")
    parser.add_argument("--val-count", type=int, default=defaults.val_count, help="validation images")
    parser.add_argument("--heldout-count", type=int, default=defaults.heldout_count,
                        help="images with a held-out combination")
    parser.add_argument("--shard-size", type=int, default=defaults.shard_size, help="samples per shard")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--colours", nargs="+", default=list(defaults.colours), help=f"of {list(COLOURS)}")
    parser.add_argument("--shapes", nargs="+", default=list(defaults.shapes), help=f"of {list(SHAPES)}")
    parser.add_argument("--heldout", nargs="*", default=list(defaults.heldout),
                        help="'<colour> <shape>' combinations never drawn in training")
    parser.add_argument("--two-object-prob", type=float, default=defaults.two_object_prob)
    parser.add_argument("--uncoloured-caption-prob", type=float, default=defaults.uncoloured_caption_prob)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        shards = build_shapes_shards(
            args.out, force=args.force, size=args.size, count=args.count, val_count=args.val_count,
            heldout_count=args.heldout_count, shard_size=args.shard_size, seed=args.seed, colours=args.colours,
            shapes=args.shapes, heldout=args.heldout, two_object_prob=args.two_object_prob,
            uncoloured_caption_prob=args.uncoloured_caption_prob)
    except (ValueError, RuntimeError) as exn:
        raise SystemExit(f"error: {exn}") from None
    manifest = read_manifest(args.out) or {}
    print(f"{manifest.get('count')} images in {len(shards)} shards (+{manifest.get('val_count')} val, "
          f"+{manifest.get('heldout_count')} held out: {', '.join(manifest.get('heldout_combos', []))}) in "
          f"{args.out}, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
