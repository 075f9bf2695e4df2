"""Encode a shard set once into shards of cached latents (and optionally text embeddings) for stage 2.

    python -m ldm.data.cache_latents SHARDS OUT_DIR --autoencoder RUN/checkpoints/last.ckpt --resolution 256 \
        [--conditioner configs/model/conditioner/sd1_clip_l14.yaml [--conditioner-weights FILE]] [--dtype float16]
    python train.py experiment=... data=latents data.train_shards=OUT_DIR data.resolution=256

Stage 2 then skips the frozen autoencoder (and the text encoder, with --conditioner) at every step. What is
stored is the posterior q(z|x) (its mean and standard deviation, unscaled), not one sample of it, so training
still draws a fresh latent per step. Images are center-cropped without flips: augmentations are frozen into
the cache. Text embeddings cost L·d numbers per caption (77×768 for SD1) and suit ucg_rate dropout (the
empty caption is encoded at training time); caption-level augmentation needs them encoded on the fly.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ldm.data.latents import npy_bytes
from ldm.data.shards import ShardDataset, ShardLoader, expand_shards
from ldm.data.writer import TarShardWriter
from ldm.model_parts import build_conditioner, load_autoencoder

log = logging.getLogger("cache_latents")

DTYPES = {"float32": np.float32, "float16": np.float16}


def load_conditioner(config_path: str, seed: int, pretrained: str | None = None) -> torch.nn.Module:
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    if pretrained is not None:
        config["pretrained"] = pretrained  # the config files leave it null (random weights) or a tag
    conditioner = build_conditioner(config, seed)
    if not conditioner.frozen:
        raise ValueError(f"{config_path}: a trainable conditioner cannot be cached (its output changes in training)")
    return conditioner.requires_grad_(False).eval()


@torch.no_grad()
def cache_latents(
    shards: str | list[str],
    out_dir: str | Path,
    autoencoder_ckpt: str,
    resolution: int,
    conditioner: str | None = None,
    conditioner_seed: int = 0,
    batch_size: int = 64,
    shard_size: int = 1000,
    dtype: str = "float32",
    device: str = "cpu",
    num_workers: int = 2,
    conditioner_pretrained: str | None = None,
) -> dict:
    """Encode every sample of ``shards`` (in order, each once) and write cached-latent shards into ``out_dir``.
    Returns the summary also written to OUT_DIR/cache.json. ``conditioner_pretrained`` replaces the conditioner
    config's ``pretrained`` (a local weights file): train with the same value of model.conditioner.pretrained."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.glob("*.tar")):
        raise FileExistsError(f"{out_dir} already holds shards; choose an empty folder")
    autoencoder, _, _ = load_autoencoder(autoencoder_ckpt)
    autoencoder = autoencoder.to(device).eval()
    text = load_conditioner(conditioner, conditioner_seed, conditioner_pretrained) if conditioner else None
    if text is not None:
        text = text.to(device)
    # Every sample once, in order, center-cropped: the same preprocessing as training without augmentation.
    dataset = ShardDataset(shards, resolution=resolution, shuffle=False, resampled=False, split_nodes=False,
                           missing_caption="empty")
    loader = ShardLoader(dataset, batch_size=batch_size, num_workers=num_workers, persistent_workers=False)
    np_dtype = DTYPES[dtype]
    start, count = time.perf_counter(), 0
    with TarShardWriter(out_dir, prefix="latents", shard_size=shard_size) as writer:
        for batch in loader:
            posterior = autoencoder.encode(batch["image"].to(device))
            mean, std = posterior.mean.float().cpu().numpy(), posterior.std.float().cpu().numpy()
            context = mask = None
            if text is not None:
                context, mask = text(batch["caption"])
                context, mask = context.float().cpu().numpy(), mask.cpu().numpy()
            for i, key in enumerate(batch["key"]):
                files: dict = {"latent.npy": npy_bytes(mean[i].astype(np_dtype)),
                               "std.npy": npy_bytes(std[i].astype(np_dtype)), "txt": batch["caption"][i]}
                if context is not None:
                    # Drop the fully masked padding chunks the batch added beyond this caption's own length.
                    length = int(np.nonzero(mask[i])[0].max()) + 1 if mask[i].any() else context.shape[1]
                    tokens = text.tokens_per_chunk
                    length = -(-length // tokens) * tokens
                    files["context.npy"] = npy_bytes(context[i, :length].astype(np_dtype))
                    files["mask.npy"] = npy_bytes(mask[i, :length].astype(bool))
                writer.write(key, files)
            count += len(batch["key"])
            log.info("encoded %d samples", count)
    seconds = time.perf_counter() - start
    summary = {
        "source_shards": expand_shards(shards), "autoencoder_ckpt": str(autoencoder_ckpt), "resolution": resolution,
        "latent_shape": list(mean.shape[1:]) if count else None, "dtype": dtype, "samples": count,
        "conditioner": conditioner, "conditioner_seed": conditioner_seed if conditioner else None,
        "conditioner_pretrained": conditioner_pretrained if conditioner else None,
        "shards": writer.shards, "seconds": round(seconds, 2),
    }
    (out_dir / "cache.json").write_text(json.dumps(summary, indent=2))
    log.info("wrote %d cached samples into %d shards in %s (%.1f s)", count, len(writer.shards), out_dir, seconds)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="source shards: a brace pattern, glob or folder of *.tar")
    parser.add_argument("out_dir", help="an empty folder for the cached-latent shards")
    parser.add_argument("--autoencoder", required=True, help="the autoencoder stage 2 will use, as "
                        "autoencoder.ckpt_path (a stage-1 checkpoint, a diffusers folder or an SD single file)")
    parser.add_argument("--resolution", type=int, required=True, help="image side, as data.resolution")
    parser.add_argument("--conditioner", help="a conditioner config (configs/model/conditioner/*.yaml) whose "
                                              "text embeddings to cache as well")
    parser.add_argument("--conditioner-weights", help="the text encoder's weights (a local file), as "
                                                     "model.conditioner.pretrained; default: the config's")
    parser.add_argument("--conditioner-seed", type=int, default=0, help="as model.conditioner_seed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per output shard")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="storage type of latents and contexts (float16 halves the size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cache_latents(args.shards, args.out_dir, args.autoencoder, args.resolution, args.conditioner,
                      args.conditioner_seed, args.batch_size, args.shard_size, args.dtype, args.device,
                      args.num_workers, args.conditioner_weights)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
