"""Generate images from a trained model: `python sample.py ckpt=PATH prompt="..." n=4 out=DIR`.

Writes one PNG per image, `grid.png` (a row per prompt) and `metadata.jsonl` (prompt and seed of each image)
into DIR. The same seed gives the same images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from ldm.cli_errors import friendly_errors

log = logging.getLogger("sample")


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file not found: {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompts_file {path} holds no prompts")
        return prompts
    if cfg.prompt is None:
        raise ValueError('give prompt="..." or prompts_file=FILE (prompt="" samples unconditionally)')
    return [str(cfg.prompt)]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sample(cfg: DictConfig) -> list[Path]:
    from ldm.pipeline import LatentDiffusionPipeline
    from ldm.training.images import grid_image

    prompts = read_prompts(cfg)
    device = pick_device(cfg.device)
    pipe = LatentDiffusionPipeline.from_checkpoint(cfg.ckpt, use_ema=cfg.use_ema, device=device)
    log.info("loaded %s (%s weights) on %s", cfg.ckpt, "EMA" if cfg.use_ema else "raw", device)
    result = pipe.generate(
        prompts,
        negative_prompt=cfg.negative_prompt,
        n=cfg.n,
        steps=cfg.steps,
        sampler=cfg.sampler,
        eta=cfg.eta,
        cfg_scale=cfg.cfg_scale,
        guidance_rescale=cfg.guidance_rescale,
        seed=cfg.seed,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with open(out / "metadata.jsonl", "w") as meta:
        for i, (image, prompt, seed) in enumerate(zip(result.pil(), result.prompts, result.seeds)):
            path = out / f"{i:04d}.png"
            image.save(path)
            paths.append(path)
            meta.write(json.dumps({"file": path.name, "prompt": prompt, "seed": seed,
                                   "negative_prompt": cfg.negative_prompt}) + "\n")
    upscale = max(1, 128 // result.images.shape[-1])
    grid_image(result.images, nrow=cfg.n, upscale=upscale).save(out / "grid.png")
    log.info("wrote %d images and grid.png to %s", len(paths), out)
    return paths


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
@friendly_errors
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
