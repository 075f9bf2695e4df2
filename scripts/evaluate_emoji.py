"""Measure a trained emoji model: does each caption produce its own emoji, how well does the autoencoder
reconstruct emoji it never saw, and what were the final losses.

    python scripts/evaluate_emoji.py --run runs/quickstart

- top-1 rate: for each caption, sample one image and find the nearest training image (pixel L2 at the sample
  resolution); a hit is when that is the caption's own emoji. Reported for the fixed grid captions and for every
  training caption.
- PSNR of stage-1 reconstructions (posterior mode) on the held-out emoji.
- final losses: mean of the last 50 logged training steps of each stage.
Ends with `RESULT name=value` lines and writes RUN/report.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.evaluation.emoji import NearestTrainingImage, read_images, reconstruction_psnr  # noqa: E402
from ldm.pipeline import LatentDiffusionPipeline  # noqa: E402
from ldm.model_parts import load_autoencoder  # noqa: E402
from ldm.weights_io import load_checkpoint  # noqa: E402


def final_loss(metrics_csv: Path, column: str, last: int = 50) -> float | None:
    if not metrics_csv.is_file():
        return None
    with open(metrics_csv) as f:
        values = [float(row[column]) for row in csv.DictReader(f) if row.get(column)]
    return sum(values[-last:]) / len(values[-last:]) if values else None


def top1_rate(pipe, captions, training: NearestTrainingImage, sample_args) -> tuple[float, list[bool]]:
    hits = training.hits(pipe.generate(captions, n=1, **sample_args).images, captions).tolist()
    return sum(hits) / len(hits), hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="the quick start's output folder")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: the model's sampling setting")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    ae_ckpt = args.run / "autoencoder" / "checkpoints" / "last.ckpt"
    ldm_ckpt = args.run / "ldm" / "checkpoints" / "last.ckpt"
    hp = load_checkpoint(ldm_ckpt)["hyper_parameters"]
    pipe = LatentDiffusionPipeline.from_checkpoint(ldm_ckpt)
    resolution = pipe.image_size
    data_cfg = json.loads((args.run / "data.json").read_text())
    training = NearestTrainingImage.from_shards(data_cfg["train_shards"], resolution)
    sample_args = dict(steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed, batch_size=64)

    report: dict[str, float | None] = {}
    fixed = list(hp["sampling"]["prompts"])
    report["top1_fixed_captions"], hits = top1_rate(pipe, fixed, training, sample_args)
    report["top1_all_training_captions"], _ = top1_rate(pipe, training.captions, training, sample_args)

    autoencoder, _, _ = load_autoencoder(str(ae_ckpt))
    held_out, _ = read_images(data_cfg["val_shards"], resolution)
    report["heldout_psnr_db"] = float(reconstruction_psnr(autoencoder, held_out).mean())
    report["stage1_final_rec_loss"] = final_loss(args.run / "autoencoder" / "csv" / "metrics.csv", "train/rec_loss")
    report["stage2_final_loss"] = final_loss(args.run / "ldm" / "csv" / "metrics.csv", "train/loss")
    report["num_training_emoji"] = len(training.captions)
    report["num_heldout_emoji"] = len(held_out)

    print(f"{'caption':40s} own emoji nearest?")
    for caption, hit in zip(fixed, hits):
        print(f"{caption:40s} {'yes' if hit else 'no'}")
    (args.run / "report.json").write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        print(f"RESULT {key}={value if value is None else round(value, 4)}")


if __name__ == "__main__":
    main()
