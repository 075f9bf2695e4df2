"""Generate images from a trained model: `python sample.py ckpt=PATH prompt="..." n=4 out=DIR`.

Writes one PNG per image, `grid.png` (a row per prompt) and `metadata.jsonl` (prompt and seed of each image)
into DIR. The same seed gives the same images.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from ldm.cli_errors import friendly_errors
from ldm.cli_overrides import quote_brace_patterns
from ldm.config_checks import check_generation_options
from ldm.editing import (attend_and_excite, generate_with_attention_maps, prompt_to_prompt, save_attention_figure,
                         save_edit_figure)
from ldm.images import grid_image
from ldm.pipeline import LatentDiffusionPipeline

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


def generate_options(cfg: DictConfig) -> dict:
    """The keyword arguments shared by plain generation and the attention tools."""
    return dict(negative_prompt=cfg.negative_prompt, steps=cfg.steps, sampler=cfg.sampler, eta=cfg.eta,
                cfg_scale=cfg.cfg_scale, guidance_rescale=cfg.guidance_rescale, image_size=cfg.image_size,
                progress=cfg.progress)


def sample_with_attention_tools(cfg: DictConfig, pipe, prompts: list[str], out: Path) -> list[Path]:
    """Attention maps, Prompt-to-Prompt and Attend-and-Excite: one image per prompt (seed + i)."""
    from omegaconf import OmegaConf

    options = generate_options(cfg)
    paths: list[Path] = []
    meta = open(out / "metadata.jsonl", "w")
    for i, prompt in enumerate(prompts):
        seed = cfg.seed + i
        record: dict = {"prompt": prompt, "seed": seed}
        if cfg.edit:
            if not cfg.target_prompt and cfg.edit != "reweight":
                raise ValueError(f"edit={cfg.edit} needs target_prompt=\"...\" (the edited prompt)")
            result = prompt_to_prompt(
                pipe, prompt, cfg.target_prompt or None, edit=cfg.edit, cross_replace_steps=cfg.cross_replace_steps,
                self_replace_steps=cfg.self_replace_steps, edit_words=list(cfg.edit_words) or None,
                edit_weight=cfg.edit_weight, blend_words=list(cfg.blend_words) or None, seed=seed, **options)
            paths.append(save_edit_figure(out, i, result))
            record.update(target_prompt=result.prompts[1], edit=cfg.edit, file=paths[-1].name)
        elif cfg.attend_excite.tokens:
            ae = OmegaConf.to_container(cfg.attend_excite, resolve=True)
            tokens = ae.pop("tokens")
            ae["thresholds"] = {int(k): float(v) for k, v in ae["thresholds"].items()}
            ae["scale_range"] = tuple(ae["scale_range"])
            result, losses = attend_and_excite(pipe, prompt, tokens, seed=seed, **ae, **options)
            path = out / f"{i:04d}.png"
            result.pil()[0].save(path)
            paths.append(path)
            record.update(attend_excite_tokens=tokens, losses=losses, file=path.name)
            log.info("Attend-and-Excite losses per step for %r: %s", prompt,
                     ", ".join(f"{x:.3f}" for x in losses))
        if cfg.attention_maps:
            window = tuple(cfg.attention_steps) if cfg.attention_steps else None
            result, maps, labels = generate_with_attention_maps(
                pipe, prompt, resolution=cfg.attention_resolution, step_window=window, seed=seed, **options)
            paths.append(save_attention_figure(out, i, result, maps, labels))
            torch.save({"maps": maps, "labels": labels, "prompt": prompt}, out / f"attention_{i}.pt")
            record.update(attention_file=paths[-1].name)
        meta.write(json.dumps(record) + "\n")
    meta.close()
    log.info("wrote %d files to %s", len(paths), out)
    return paths


def sample(cfg: DictConfig) -> list[Path]:
    prompts = read_prompts(cfg)
    check_generation_options(cfg.n, cfg.steps, cfg.cfg_scale, cfg.eta, cfg.guidance_rescale, cfg.batch_size)
    device = pick_device(cfg.device)
    pipe = LatentDiffusionPipeline.from_checkpoint(cfg.ckpt, use_ema=cfg.use_ema, device=device)
    log.info("loaded %s (%s weights) on %s", cfg.ckpt, "EMA" if cfg.use_ema else "raw", device)
    if cfg.get("lora"):
        # Merged: the same images as the unmerged adapter, without its cost at every step.
        pipe.apply_lora(cfg.lora, scale=cfg.lora_scale, merge=True)
        log.info("LoRA adapter %s applied (scale %g)", cfg.lora, cfg.lora_scale)
    if cfg.channels_last:
        # NHWC weights: the convolutions skip their layout reorders and the transformers' token view is free
        # (3-4 % faster sampling on a CPU, BENCHMARKS.md); the same images to float rounding.
        pipe.unet.to(memory_format=torch.channels_last)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.attention_maps or cfg.edit or cfg.attend_excite.tokens:
        return sample_with_attention_tools(cfg, pipe, prompts, out)
    # Prompts beyond the conditioner's max_chunks are cut with a warning that quotes the dropped text.
    result = pipe.generate(prompts, n=cfg.n, seed=cfg.seed, batch_size=cfg.batch_size, **generate_options(cfg))
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
    sys.argv = quote_brace_patterns(sys.argv)
    main()
