"""The quick start: build the emoji shards, train the autoencoder (stage 1) and the text-to-image model
(stage 2), sample a grid for fixed training captions and measure the result. Runs on a 2-core CPU in about
a quarter of an hour.

    python scripts/quickstart.py [--out runs/quickstart] [extra overrides for both stages ...]
    python scripts/quickstart.py --inception-weights pt_inception-2015-12-05-6726825d.pth [--clip-weights F]

Writes OUT/autoencoder, OUT/ldm (checkpoints, logs, images), OUT/samples (grid.png and one PNG per caption)
and OUT/report.json. Both stages log an evaluation curve against the number of training images (the
`evaluation` callback, in OUT/*/csv/metrics.csv): stage 1 the held-out reconstruction PSNR, stage 2 the top-1
rate of the 16 fixed captions and, given Inception weights, FID and KID against statistics of the 128
training emoji made with those weights first (given CLIP weights, of open_clip ViT-B-32, the CLIP score).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the grid and evaluation helpers import ldm, installed or not


def step(title: str, *args: str) -> None:
    print(f"\n=== {title}\n$ {' '.join(args)}", flush=True)
    start = time.time()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    print(f"=== {title}: {time.time() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "quickstart")
    parser.add_argument("--skip-training", action="store_true",
                        help="reuse the checkpoints already in OUT: only sample and evaluate")
    parser.add_argument("--inception-weights", type=Path, default=None,
                        help="a local FID Inception weights file: stage 2 then logs FID and KID too")
    parser.add_argument("--clip-weights", type=Path, default=None,
                        help="a local open_clip ViT-B-32 checkpoint: stage 2 then logs the CLIP score too")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to both training stages")
    args = parser.parse_args()
    out = args.out.resolve()
    started = time.time()

    if not args.skip_training:
        train_both_stages(out, args.overrides, evaluation_overrides(out, args))
    sample_and_evaluate(out)
    print_evaluation_curves(out)
    print(f"\nquick start finished in {time.time() - started:.0f} s; grid: {out}/samples/captions_grid.png")


def evaluation_overrides(out: Path, args) -> list[str]:
    """Stage 2's extra measures: FID/KID need reference statistics made with the same Inception weights as the
    evaluation (the shipped ones come from random weights), made here from the training shards."""
    extra = []
    if args.inception_weights:
        data_dir = Path(os.environ.get("LDM_DATA_DIR", ROOT / "data"))
        shards = data_dir / "emoji_32px_128"  # the emoji experiment's training set (configs/data/emoji.yaml)
        stats = out / "emoji_reference_stats.npz"
        step("emoji shards", "-m", "ldm.data.build_emoji", "--out", str(shards), "--size", "32", "--subset", "128",
             "--holdout", "16", "--shard-size", "64")
        step("FID reference statistics", "-m", "ldm.evaluation.reference_stats", str(shards), str(stats),
             "--resolution", "32", "--inception-weights", str(args.inception_weights.resolve()))
        extra += [f"evaluation.inception.weights={args.inception_weights.resolve()}", f"evaluation.ref_stats={stats}"]
    if args.clip_weights:
        extra.append(f"evaluation.clip.weights={args.clip_weights.resolve()}")
    return extra


def train_both_stages(out: Path, overrides: list[str], stage2_extra: list[str] = ()) -> None:
    step("stage 1: autoencoder", "train.py", "experiment=emoji_autoencoder", f"hydra.run.dir={out}/autoencoder",
         *overrides)
    step("stage 2: text-to-image latent diffusion", "train.py", "experiment=emoji_ldm",
         f"autoencoder.ckpt_path={out}/autoencoder/checkpoints/last.ckpt", f"hydra.run.dir={out}/ldm",
         *stage2_extra, *overrides)


def print_evaluation_curves(out: Path) -> None:
    """The rows the evaluation callback logged: quality against the number of training images."""
    for stage in ("autoencoder", "ldm"):
        path = out / stage / "csv" / "metrics.csv"
        if not path.is_file():
            continue
        rows = [r for r in csv.DictReader(open(path)) if r.get("eval/images_seen")]
        columns = [c for c in ("eval/heldout_psnr", "eval/top1", "eval/fid", "eval/kid", "eval/clip_score",
                               "eval/seconds") if rows and rows[0].get(c)]
        print(f"\nevaluation curve, {stage} ({path}):")
        print("  " + "  ".join(f"{c.removeprefix('eval/'):>14s}" for c in ["eval/images_seen", *columns]))
        for row in rows:
            print("  " + "  ".join(f"{float(row[c]):14.4g}" for c in ["eval/images_seen", *columns]))


def sample_and_evaluate(out: Path) -> None:
    # The data the runs used, for the evaluation (the shard folders come from the resolved config).
    from ldm.run_folder import saved_config

    cfg = saved_config(out / "ldm")
    (out / "data.json").write_text(json.dumps({"train_shards": cfg.data.train_shards, "val_shards": cfg.data.val_shards}))

    prompts = list(cfg.model.sampling.prompts)
    (out / "captions.txt").write_text("\n".join(prompts) + "\n")
    step("sampling the fixed captions", "sample.py", f"ckpt={out}/ldm/checkpoints/last.ckpt",
         f"prompts_file={out}/captions.txt", "n=1", f"out={out}/samples", "progress=false")

    from PIL import Image

    from ldm.data.shards import ShardDataset
    from ldm.images import labelled_grid, to_pil

    # Each row of samples above the training emoji of the same captions, upscaled (nearest) to be seen.
    images = [Image.open(out / "samples" / f"{i:04d}.png") for i in range(len(prompts))]
    training = {s["caption"]: s["image"] for s in ShardDataset(cfg.data.train_shards, resolution=cfg.data.resolution,
                                                                shuffle=False, resampled=False)}
    cells, labels, ncol = [], [], min(8, len(prompts))
    for start in range(0, len(prompts), ncol):
        row = prompts[start:start + ncol]
        cells += images[start:start + ncol] + [to_pil(training[p][None])[0] for p in row]
        labels += row + ["(training image)"] * len(row)
    labelled_grid(cells, labels, ncol=ncol, cell=96).save(out / "samples" / "captions_grid.png")

    step("evaluation", "scripts/evaluate_emoji.py", "--run", str(out))


if __name__ == "__main__":
    main()
