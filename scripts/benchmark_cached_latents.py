"""Stage-2 training speed on images (autoencoder and text encoder run every step) against cached latents and
text embeddings (`python -m ldm.data.cache_latents`, `data=latents`).

    python scripts/benchmark_cached_latents.py --vae emoji   # the emoji autoencoder (f=4) on 32 px images
    python scripts/benchmark_cached_latents.py --vae sd      # Stable Diffusion's KL-f8 autoencoder on 64 px images

Both use the emoji U-Net and text encoder on 8×8×4 latents, OpenMoji shards, batch 32, data read in the training
process (num_workers=0), and random autoencoder weights (the speed does not depend on them). Prints RESULT
lines: seconds per training step (median of the timed steps, data loading included; the fastest of
`--repeats` alternating runs) for each input, the speed-up, and the one-off cost of writing the cache.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))
VAES = {
    "emoji": (dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, norm="none"), 32),  # emoji_autoencoder
    "sd": (dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4), 64),  # SD's KL-f8, 83.7 M
}


class StepTimer(L.Callback):
    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())


def train_steps(module, datamodule, steps: int, root: Path) -> float:
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        default_root_dir=str(root))
    trainer.fit(module, datamodule)
    gaps = [b - a for a, b in zip(timer.ends[1:], timer.ends[2:])]  # skip the first steps (warm-up)
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", choices=tuple(VAES), default="emoji")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--subset", type=int, default=128, help="emoji in the shard set")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind (the fastest counts)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    from ldm.data.build_emoji import build_emoji_shards
    from ldm.data.cache_latents import cache_latents
    from ldm.data.datamodule import ShardDataModule
    from ldm.data.latents import LatentDataModule
    from ldm.modules.autoencoder import AutoencoderKL
    from ldm.training.diffusion_module import DiffusionModule

    vae_config, resolution = VAES[args.vae]
    work = Path(tempfile.mkdtemp(prefix="bench_latents_"))
    shards = build_emoji_shards(work / "images", size=resolution, subset=args.subset, shard_size=64, holdout=0)
    ae = AutoencoderKL(**vae_config)
    ae_ckpt = work / "ae.ckpt"
    torch.save({"hyper_parameters": {"autoencoder": vae_config},
                "state_dict": {f"autoencoder.{k}": v for k, v in ae.state_dict().items()}}, ae_ckpt)
    text = ROOT / "configs" / "model" / "conditioner" / "emoji_clip.yaml"
    start = time.perf_counter()
    summary = cache_latents(shards, work / "latents", str(ae_ckpt), resolution, conditioner=str(text),
                            batch_size=args.batch, num_workers=0)
    cache_seconds = time.perf_counter() - start

    unet = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(ROOT / "configs/model/unet/sd1.yaml"),
                                                  OmegaConf.load(ROOT / "configs/model/unet/emoji.yaml")))
    unet.pop("defaults", None)
    conditioner = OmegaConf.to_container(OmegaConf.load(text))

    def module():
        torch.manual_seed(0)
        return DiffusionModule.from_settings(dict(
            unet=unet, conditioner=conditioner, schedule={}, autoencoder_ckpt=str(ae_ckpt), scale_factor=1.0,
            ema={"decay": 0.999}, optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4},
            lr_schedule={"kind": "constant", "warmup_steps": 0}))

    common = dict(resolution=resolution, batch_size=args.batch, num_workers=0, resampled=True,
                  epoch_length=args.batch * (args.steps + 1))
    # Alternating runs, the faster of each kind's: other load on the machine only ever slows a run down.
    on_the_fly = cached = float("inf")
    for _ in range(args.repeats):
        on_the_fly = min(on_the_fly, train_steps(module(), ShardDataModule(shards, **common), args.steps, work))
        cached = min(cached, train_steps(module(), LatentDataModule(summary["shards"], **common), args.steps, work))
    images_mb = sum(Path(s).stat().st_size for s in shards) / 2**20
    cache_mb = sum(Path(s).stat().st_size for s in summary["shards"]) / 2**20
    where = (f"vae={args.vae} vae_params_m={sum(p.numel() for p in ae.parameters()) / 1e6:.1f} "
             f"image={resolution}px latent={'x'.join(map(str, summary['latent_shape']))} batch={args.batch} "
             f"threads={torch.get_num_threads()}")
    print(f"RESULT step_s input=images {where} value={on_the_fly:.3f}")
    print(f"RESULT step_s input=cached_latents+text {where} value={cached:.3f}")
    print(f"RESULT cached_latent_speedup {where} value={on_the_fly / cached:.2f}x")
    print(f"RESULT cache_build {where} samples={summary['samples']} seconds={cache_seconds:.1f} "
          f"image_shards_mb={images_mb:.1f} cache_mb={cache_mb:.1f}")


if __name__ == "__main__":
    main()
