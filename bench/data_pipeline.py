"""Data pipeline: decoded and augmented images per second per worker, against what a training step consumes.

    python bench/data_pipeline.py                  # 64² and 256² training resolution from JPEG shards

The shards are built with ldm.data.build_folder from generated JPEGs at 1.5× the training resolution in a 4:3
frame (emoji glyphs from the OpenMoji font on smooth colour fields, or the fields alone without the emoji
packages), so every sample is decoded, resized, randomly cropped and flipped. One ShardDataset runs in this
process with one torch thread: that is one DataLoader worker's throughput. The emoji U-Net's training step
(bench/unet_train.py, batch 64) is timed here too, to say how many workers keep it fed.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import base_parser, build_unet, fmt, print_header, print_table, result, setup, summary
from unet_train import make_inputs, make_step, ours_call


def generated_images(count: int, width: int, height: int, seed: int = 0):
    """RGB images with photo-like JPEG cost: a smooth random colour field, noise, and an emoji on top."""
    rng = np.random.default_rng(seed)
    try:
        from ldm.data.build_emoji import EmojiRenderer, named_glyphs

        renderer = EmojiRenderer(size=min(width, height) // 2)
        glyphs = named_glyphs()
    except Exception:  # noqa: BLE001 - the emoji packages are optional here
        renderer, glyphs = None, []
    made = 0
    for i in range(count * 4):
        if made == count:
            return
        coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
        field += rng.normal(0, 12, size=field.shape)
        image = Image.fromarray(field.clip(0, 255).astype(np.uint8)).convert("RGBA")
        if renderer is not None:
            glyph = renderer.render(glyphs[(i * 7919) % len(glyphs)].sequence)
            if glyph is None:
                continue
            image.alpha_composite(glyph, ((width - glyph.width) // 2, (height - glyph.height) // 2))
        made += 1
        yield image.convert("RGB"), (glyphs[(i * 7919) % len(glyphs)].caption if renderer else f"colour field {i}")


def build_shards(root: Path, resolution: int, count: int) -> list[str]:
    from ldm.data.build_folder import build_folder_shards

    src = root / f"src{resolution}"
    src.mkdir(parents=True)
    width, height = resolution * 2, resolution * 3 // 2  # 1.5× the resolution on the short side, 4:3
    for i, (image, caption) in enumerate(generated_images(count, width, height)):
        image.save(src / f"{i:05d}.jpg", quality=90)
        (src / f"{i:05d}.txt").write_text(caption)
    return build_folder_shards(src, root / f"shards{resolution}", shard_size=max(1, count // 4))


def loader_rate(shards: list[str], resolution: int, count: int) -> dict[str, float]:
    """Images/s of one worker: read tar, shuffle buffer, decode, resize, random crop, flip, to tensor."""
    from ldm.data.shards import ShardDataset

    dataset = ShardDataset(shards, resolution=resolution, random_crop=True, flip_prob=0.5, shuffle_buffer=64,
                           resampled=True, epoch_length=count, seed=0)
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        n = sum(1 for _ in dataset)
        rates.append(n / (time.perf_counter() - start))
    return summary(rates)


def model_rate(args) -> float:
    """Images/s of the emoji U-Net's training step (ours, batch 64)."""
    model, kwargs = build_unet("emoji")
    model.train()
    x, t, context, mask, target = make_inputs(kwargs, 64, 8, "cpu", False)
    step, _ = make_step(ours_call(model, x, t, context, mask), list(model.parameters()), target, args)
    step()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 64 / summary(times)["median"]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="images per shard set")
    args = parser.parse_args()
    args.images = args.images or (128 if args.quick else 512)
    setup(args)
    threads = torch.get_num_threads()
    print_header("Data pipeline: one worker against the emoji training step", args)
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for resolution in (64, 256):
            shards = build_shards(Path(tmp), resolution, args.images)
            torch.set_num_threads(1)  # as in a DataLoader worker
            rate = loader_rate(shards, resolution, args.images)
            torch.set_num_threads(threads)
            rows.append([f"{resolution}²", f"{resolution * 2}×{resolution * 3 // 2} JPEG",
                         f"{fmt(rate['median'])} [{fmt(rate['min'])}–{fmt(rate['max'])}]"])
            figures[f"data_{resolution}px_images_per_s_per_worker"] = rate["median"]
    consumed = model_rate(args)
    print(f"{args.images} images per set, 3 passes; one worker = one process, one torch thread")
    print_table(["training resolution", "source", "images/s per worker (median [min–max])"], rows)
    print(f"emoji U-Net training step (ours, batch 64, {threads} threads): {fmt(consumed)} images/s")
    for resolution in (64, 256):
        per_worker = figures[f"data_{resolution}px_images_per_s_per_worker"]
        need = math.ceil(consumed / per_worker)
        print(f"  {resolution}²: one worker feeds a model of up to {fmt(per_worker)} images/s; the emoji model needs "
              f"{need} worker(s); with W workers the loader is the bottleneck above W × {fmt(per_worker)} images/s")
    figures["data_emoji_model_images_per_s"] = consumed
    for name, value in figures.items():
        result(name, value)


if __name__ == "__main__":
    main()
