"""The quick start: build the emoji shards, train the autoencoder (stage 1) and the text-to-image model
(stage 2), sample a grid for fixed training captions and measure the result. Runs on a 2-core CPU in about
a quarter of an hour.

    python scripts/quickstart.py [--out runs/quickstart] [extra overrides for both stages ...]

Writes OUT/autoencoder, OUT/ldm (checkpoints, logs, images), OUT/samples (grid.png and one PNG per caption)
and OUT/report.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step(title: str, *args: str) -> None:
    print(f"\n=== {title}\n$ {' '.join(args)}", flush=True)
    start = time.time()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    print(f"=== {title}: {time.time() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "quickstart")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to both training stages")
    args = parser.parse_args()
    out = args.out.resolve()
    started = time.time()

    step("stage 1: autoencoder", "train.py", "experiment=emoji_autoencoder", f"hydra.run.dir={out}/autoencoder",
         *args.overrides)
    step("stage 2: text-to-image latent diffusion", "train.py", "experiment=emoji_ldm",
         f"autoencoder.ckpt_path={out}/autoencoder/checkpoints/last.ckpt", f"hydra.run.dir={out}/ldm",
         *args.overrides)

    # The data the runs used, for the evaluation (the shard folders come from the resolved config).
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(out / "ldm" / ".hydra" / "config.yaml")
    (out / "data.json").write_text(json.dumps({"train_shards": cfg.data.train_shards, "val_shards": cfg.data.val_shards}))

    prompts = list(cfg.model.sampling.prompts)
    (out / "captions.txt").write_text("\n".join(prompts) + "\n")
    step("sampling the fixed captions", "sample.py", f"ckpt={out}/ldm/checkpoints/last.ckpt",
         f"prompts_file={out}/captions.txt", "n=1", f"out={out}/samples", "progress=false")

    from PIL import Image

    from ldm.training.images import labelled_grid

    images = [Image.open(out / "samples" / f"{i:04d}.png") for i in range(len(prompts))]
    labelled_grid(images, prompts, ncol=min(8, len(prompts))).save(out / "samples" / "captions_grid.png")

    step("evaluation", "scripts/evaluate_emoji.py", "--run", str(out))
    print(f"\nquick start finished in {time.time() - started:.0f} s; grid: {out}/samples/captions_grid.png")


if __name__ == "__main__":
    main()
