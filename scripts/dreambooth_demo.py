"""DreamBooth on the built-in emoji model, on the CPU: teach the quick start's model an emoji it never saw.

    python scripts/dreambooth_demo.py [--base runs/quickstart/ldm/checkpoints/last.ckpt] [--out runs/dreambooth_demo]

1. The subject: of the held-out emoji (never in the training set), the one farthest (pixel L2) from every
   training image, rendered six times with small shifts and scales: the instance images.
2. DreamBooth with prior preservation ("a sks emoji", class "an emoji"), through
   `python train.py experiment=dreambooth ...`: once fine-tuning the whole U-Net, once with LoRA adapters
   (exported with `python -m ldm.export_lora` and applied to the base model, as a user would).
3. The measure: for each model, N samples of "a sks emoji" (and of "an emoji"), and the share of them that lie
   closer (pixel L2) to one of the subject's images than to any training image; before and after.
4. The figure (--figure, e.g. docs/dreambooth.png): subject, then samples before and after.

Ends with `RESULT name=value` lines (also in OUT/report.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.data.shards import ShardDataset  # noqa: E402
from ldm.images import to_pil  # noqa: E402
from ldm.pipeline import LatentDiffusionPipeline  # noqa: E402

PROMPT = "a sks emoji"
CLASS_PROMPT = "an emoji"
# (shift x, shift y) in pixels of the 32-px image, and scale: small changes, the same subject.
AUGMENTATIONS = [(0, 0, 1.0), (-2, 0, 1.0), (2, 1, 1.0), (0, -2, 0.9), (1, 2, 0.9), (0, 0, 1.1)]


def read_shards(shards: str, resolution: int) -> tuple[torch.Tensor, list[str], list[str]]:
    samples = list(ShardDataset(shards, resolution=resolution, shuffle=False, resampled=False))
    return (torch.stack([s["image"] for s in samples]), [s["caption"] for s in samples],
            [s["key"] for s in samples])


def render_subject(key: str, size: int, out: Path) -> list[Path]:
    """The emoji of shard key ``key`` (its code points, "1f331" or "1f3c4-200d-2640-fe0f"), drawn at 4× and
    reduced to ``size`` with each augmentation; RGB on white, as training images are."""
    from ldm.data.build_emoji import EmojiRenderer

    sequence = "".join(chr(int(part, 16)) for part in key.split("-"))
    big = 4 * size
    glyph = EmojiRenderer(size=big).render(sequence)
    if glyph is None:
        raise ValueError(f"the emoji font cannot draw {key!r}")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (dx, dy, scale) in enumerate(AUGMENTATIONS):
        side = round(big * scale)
        scaled = glyph.resize((side, side), Image.Resampling.LANCZOS)
        canvas = Image.new("RGBA", (big, big), (255, 255, 255, 255))
        canvas.alpha_composite(scaled, ((big - side) // 2 + 4 * dx, (big - side) // 2 + 4 * dy))
        path = out / f"subject_{i}.png"
        canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS).save(path)
        paths.append(path)
    return paths


def train(name: str, base: Path, out: Path, overrides: list[str], threads: int) -> float:
    command = [sys.executable, "train.py", "experiment=dreambooth", f"init_from={base}",
               f"instance_data={out / 'instance'}", f'instance_prompt="{PROMPT}"', f'class_prompt="{CLASS_PROMPT}"',
               f"hydra.run.dir={out / name}", *overrides]
    print("$ " + " ".join(command[1:]), flush=True)
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.time() - start


def closer_to_subject(samples: torch.Tensor, subject: torch.Tensor, train_images: torch.Tensor) -> tuple[float, float]:
    """(share of samples nearer to a subject image than to every training image, mean L2 to the subject)."""
    to_subject = torch.cdist(samples.flatten(1), subject.flatten(1)).min(dim=1).values
    to_train = torch.cdist(samples.flatten(1), train_images.flatten(1)).min(dim=1).values
    return float((to_subject < to_train).float().mean()), float(to_subject.mean())


def figure(rows: list[tuple[str, torch.Tensor]], path: Path, cell: int = 64) -> None:
    """One labelled row of images per entry, images upscaled (nearest) to ``cell`` pixels."""
    font = ImageFont.load_default(size=13)
    label_width = 170
    ncol = max(len(images) for _, images in rows)
    sheet = Image.new("RGB", (label_width + ncol * (cell + 2), len(rows) * (cell + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        y = r * (cell + 2)
        draw.text((4, y + cell // 2 - 6), label, fill="black", font=font)
        for c, image in enumerate(to_pil(images)):
            sheet.paste(image.resize((cell, cell), Image.NEAREST), (label_width + c * (cell + 2), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=ROOT / "runs" / "quickstart" / "ldm" / "checkpoints" / "last.ckpt")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "dreambooth_demo")
    parser.add_argument("--figure", type=Path, default=None, help="where to write the figure (e.g. docs/dreambooth.png)")
    parser.add_argument("--full-steps", type=int, default=400)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--lora-steps", type=int, default=400)
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-class-images", type=int, default=200)
    parser.add_argument("--samples", type=int, default=32, help="samples per prompt and model for the measure")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="the emoji model's guidance scale")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads: the model is tiny, and one thread is the fastest on shared cores")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to both training runs")
    args = parser.parse_args()
    base, out = args.base.resolve(), args.out.resolve()
    if not base.is_file():
        sys.exit(f"error: base checkpoint not found: {base} (run python scripts/quickstart.py first)")
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    report: dict[str, float | int | str] = {}

    # 1. the subject: the held-out emoji least like any training emoji (the shards the base run used, from the
    # resolved config its logger kept)
    from omegaconf import OmegaConf

    data_cfg = OmegaConf.load(base.parents[1] / "csv" / "hparams.yaml").data
    resolution = int(data_cfg.resolution)
    train_images, _, _ = read_shards(str(data_cfg.train_shards), resolution)
    held_out, held_captions, held_keys = read_shards(str(data_cfg.val_shards), resolution)
    novelty = torch.cdist(held_out.flatten(1), train_images.flatten(1)).min(dim=1).values
    pick = int(novelty.argmax())
    report["subject"] = held_captions[pick]
    report["subject_l2_to_nearest_training_emoji"] = float(novelty[pick])
    instance = render_subject(held_keys[pick], resolution, out / "instance")
    from ldm.data.transforms import ImageTransform

    transform = ImageTransform(resolution)
    subject = torch.stack([transform(Image.open(p)) for p in instance])
    print(f"subject: {held_captions[pick]!r} ({held_keys[pick]}), {len(instance)} instance images", flush=True)

    # 2. DreamBooth with prior preservation: the whole U-Net, then LoRA (class images made once, then reused)
    common = [f"class_data={out / 'class_images'}", f"num_class_images={args.num_class_images}",
              f"data.resolution={resolution}", f"data.batch_size={args.batch_size}", "data.sample_batch_size=50",
              f"model.sampling.cfg_scale={args.cfg_scale}", f"model.sampling.steps={args.sample_steps}",
              "callbacks.sample_images.every_n_steps=100", "trainer.enable_progress_bar=false",
              "trainer.log_every_n_steps=10", *args.overrides]
    report["full_train_seconds"] = train("full", base, out, [*common, f"trainer.max_steps={args.full_steps}",
                                                             f"model.optimizer.lr={args.full_lr}"], args.threads)
    report["lora_train_seconds"] = train("lora", base, out, [
        *common, "lora.enabled=true", f"lora.rank={args.lora_rank}", f"lora.alpha={args.lora_rank}",
        f"trainer.max_steps={args.lora_steps}", f"model.optimizer.lr={args.lora_lr}"], args.threads)
    adapter = out / "lora" / "sks_emoji_lora.safetensors"
    command = [sys.executable, "-m", "ldm.export_lora", str(out / "lora" / "checkpoints" / "last.ckpt"), str(adapter)]
    print("$ python " + " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    report["lora_adapter_bytes"] = adapter.stat().st_size
    report["full_checkpoint_bytes"] = (out / "full" / "checkpoints" / "last.ckpt").stat().st_size
    report["unet_weight_bytes"] = sum(p.numel() * 4 for p in LatentDiffusionPipeline.from_checkpoint(base).unet.parameters())

    # 3. the measure, before and after
    models = {
        "base": LatentDiffusionPipeline.from_checkpoint(base),
        "full": LatentDiffusionPipeline.from_checkpoint(out / "full" / "checkpoints" / "last.ckpt"),
        "lora": LatentDiffusionPipeline.from_checkpoint(base).apply_lora(adapter, scale=1.0, merge=True),
    }
    options = dict(n=args.samples, steps=args.sample_steps, cfg_scale=args.cfg_scale, seed=1000, batch_size=64)
    samples = {}
    for name, pipe in models.items():
        for tag, prompt in (("sks", PROMPT), ("class", CLASS_PROMPT)):
            images = pipe.generate([prompt], **options).images
            samples[name, tag] = images
            share, mean_l2 = closer_to_subject(images, subject, train_images)
            report[f"{name}_{tag}_closer_to_subject"] = share
            report[f"{name}_{tag}_mean_l2_to_subject"] = mean_l2

    # 4. the figure
    shown = 8
    rows = [("subject (instance images)", subject),
            ('before: "a sks emoji"', samples["base", "sks"][:shown]),
            ('full FT: "a sks emoji"', samples["full", "sks"][:shown]),
            ('LoRA: "a sks emoji"', samples["lora", "sks"][:shown]),
            ('before: "an emoji"', samples["base", "class"][:shown]),
            ('full FT: "an emoji"', samples["full", "class"][:shown]),
            ('LoRA: "an emoji"', samples["lora", "class"][:shown])]
    figure(rows, out / "dreambooth.png")
    if args.figure is not None:
        figure(rows, args.figure)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        print(f"RESULT {key}={round(value, 4) if isinstance(value, float) else value}")


if __name__ == "__main__":
    main()
