"""Text-to-image generation: a LatentDiffusion model → ``generate(prompts, ...)`` → images.

    pipe = LatentDiffusionPipeline.from_checkpoint("runs/emoji_ldm/checkpoints/last.ckpt")
    result = pipe.generate(["glass of milk"], negative_prompt="", n=4, steps=50, cfg_scale=7.5, seed=0)

``sample.py``, the training callbacks that sample, the evaluation and the editing tools (ldm.editing) all generate
through this class. It knows nothing of training: `from_module` takes any object with a ``sampling_model(use_ema)``
method (the training module has one).

    prompt ─ model.guidance_contexts (prompt, negative) ─┐
    seed + i ─ z_T ~ N(0, I) ─ sampler loop (DDIM, DDPM, …; cfg_model_fn: U-Net twice per step) ─ z_0
      ─ model.decode_latents ─ image
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ldm.config_checks import check_generation_options
from ldm.diffusion.guidance import cfg_model_fn
from ldm.diffusion.samplers import SAMPLERS, get_sampler, sampler_timesteps
from ldm.images import to_pil
from ldm.model import LatentDiffusion
from ldm.modules.lora import LoRAError, add_lora, has_lora, load_lora_state_dict, merge_lora, read_lora, set_lora_scale

# before_step(i, t, z_t) → z_t: called before the network sees step i (Attend-and-Excite's latent update)
BeforeStep = Callable[[int, Tensor, Tensor], Tensor]


@dataclass
class GenerationResult:
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    latents: torch.Tensor  # (N, C, h, w), scaled
    prompts: list[str]  # the prompt of each image
    seeds: list[int]  # the seed of each image

    def pil(self) -> list[Image.Image]:
        return to_pil(self.images)


class LatentDiffusionPipeline:
    def __init__(self, model: LatentDiffusion, image_size: int | None = None, defaults: dict | None = None):
        """model: what generates. image_size: the default size (None: the size the model was trained at, else
        256). defaults: default ``generate`` arguments (None: the model's sampling settings)."""
        self.model = model.eval()
        self.image_size = int(image_size or model.image_size or 256)
        sampling = {k: v for k, v in model.sampling.items() if k != "image_size"}
        self.defaults = dict(sampling if defaults is None else defaults)

    # -- construction -----------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"
                        ) -> LatentDiffusionPipeline:
        """A stage-2 checkpoint of this framework, its export (``python -m ldm.export``), a diffusers folder or a
        Stable Diffusion single file (LatentDiffusion.from_source)."""
        return cls(LatentDiffusion.from_source(path, use_ema=use_ema, device=device))

    from_pretrained = from_checkpoint  # imported weights: the same call

    @classmethod
    def from_module(cls, module, use_ema: bool = True) -> LatentDiffusionPipeline:
        """Share the weights of a training module (its ``sampling_model``: the EMA U-Net with the other parts);
        nothing is copied."""
        return cls(module.sampling_model(use_ema))

    # The model's parts, as the editing tools and callers reach them.
    unet = property(lambda self: self.model.unet)
    autoencoder = property(lambda self: self.model.autoencoder)
    conditioner = property(lambda self: self.model.conditioner)
    schedule = property(lambda self: self.model.schedule)
    prediction_type = property(lambda self: self.model.prediction_type)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- adapters ---------------------------------------------------------------------------------------------

    def apply_lora(self, path: str | Path, scale: float = 1.0, merge: bool = False) -> LatentDiffusionPipeline:
        """Adds the LoRA adapters of an adapter file (``python -m ldm.export_lora``) to this pipeline's U-Net
        (and text encoder), in place, with their update scaled by ``scale`` (0: the base model). ``merge``
        folds them into the weights: the same images, with no extra cost per step."""
        parts, settings = read_lora(path)
        targets = [("unet", self.unet, settings.target_modules, "U-Net")]
        if parts["text_encoder"]:
            text = getattr(self.conditioner, "text", None)
            if text is None:
                raise LoRAError(f"{path} has text-encoder adapters but the conditioner has no open_clip text tower")
            targets.append(("text_encoder", text, settings.text_encoder_target_modules, "text encoder"))
        for part, model, modules, what in targets:
            if has_lora(model):
                raise LoRAError(f"the {what} already has adapters; merge them first")
            add_lora(model, settings.rank, settings.alpha, 0.0, modules, what)
            load_lora_state_dict(model, parts[part], f"{path} ({what})")
        self.set_lora_scale(scale)
        if merge:
            for part, model, _, _ in targets:
                merged = merge_lora(model)
                if part == "text_encoder":
                    self.conditioner.text = merged
        return self

    def set_lora_scale(self, scale: float) -> None:
        """Scales the (unmerged) adapters' update: scale · alpha / rank."""
        set_lora_scale(self.unet, scale)
        if isinstance(getattr(self.conditioner, "text", None), torch.nn.Module):
            set_lora_scale(self.conditioner.text, scale)
        self.conditioner.clear_cache()  # cached encodings were made with the previous scale

    # -- generation -------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], negative_prompts: list[str] | None):
        """Contexts of the prompts and of their negatives (or of ""), padded to the same number of chunks."""
        with torch.no_grad():
            return self.model.guidance_contexts(prompts, negative_prompts)

    def option(self, value: Any, name: str, fallback: Any) -> Any:
        """An argument of `generate` as resolved: the value given, else the pipeline's default, else fallback."""
        return value if value is not None else self.defaults.get(name, fallback)

    @torch.no_grad()
    def generate(
        self,
        prompts: str | list[str],
        negative_prompt: str | list[str] = "",
        n: int = 1,
        steps: int | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        cfg_scale: float | None = None,
        guidance_rescale: float = 0.0,
        seed: int = 0,
        image_size: int | None = None,
        batch_size: int = 8,
        progress: bool = False,
        sampler_options: dict | None = None,
        callback: Callable | None = None,
        shared_noise: bool = False,
        before_step: BeforeStep | None = None,
    ) -> GenerationResult:
        """``n`` images per prompt. Image i of the whole request starts from noise seeded with ``seed + i`` and
        draws its per-step noise from that seed too, so an image does not depend on the batch size or on the
        other prompts of the request.

        For the editing tools: ``shared_noise`` gives every prompt the noise of ``seed`` (image 0 of a plain
        request), all prompts in one batch (Prompt-to-Prompt's source and edit share z_T); ``callback(info)`` is
        the sampler's, after every step (it may replace z_t); ``before_step(i, t, z_t)`` may change z_t before
        the network sees step i, whatever the sampler."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        steps = self.option(steps, "steps", 50)
        sampler_name = self.option(sampler, "sampler", "ddim")
        eta = self.option(eta, "eta", 0.0)
        cfg_scale = self.option(cfg_scale, "cfg_scale", 7.5)
        check_generation_options(n, steps, cfg_scale, eta, guidance_rescale, batch_size)
        size = int(image_size or self.image_size)
        if size % self.model.downsampling_factor:
            raise ValueError(f"image_size {size} must be a multiple of {self.model.downsampling_factor}")
        sample_fn = get_sampler(sampler_name)
        options = dict(self.defaults.get("sampler_options") or {})
        options.update(sampler_options or {})
        options.update(num_steps=int(steps), prediction_type=self.prediction_type)
        if sampler_name == "ddim":
            options["eta"] = float(eta)
        if shared_noise:
            n, batch_size = 1, len(prompts)

        all_prompts = [p for p in prompts for _ in range(n)]
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        all_negatives = [q for q in negatives for _ in range(n)]
        seeds = [seed] * len(all_prompts) if shared_noise else [seed + i for i in range(len(all_prompts))]
        shape = (self.unet.in_channels, size // self.autoencoder.downsampling_factor,
                 size // self.autoencoder.downsampling_factor)
        latents = []
        for start in range(0, len(all_prompts), batch_size):
            idx = slice(start, start + batch_size)
            context, mask, uncond, uncond_mask = self.model.guidance_contexts(
                all_prompts[idx], all_negatives[idx] if float(cfg_scale) != 1.0 else None)
            generators = [torch.Generator().manual_seed(s) for s in seeds[idx]]
            x_T = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)

            def noise_fn(i, noise_shape, generators=generators):
                return torch.stack([torch.randn(noise_shape[1:], generator=g) for g in generators])

            model_fn = cfg_model_fn(self.unet, context, mask, uncond, uncond_mask, float(cfg_scale), guidance_rescale)
            step_callback = callback
            if before_step is not None:
                x_T, step_callback = _with_before_step(before_step, callback, sampler_name, self.schedule,
                                                       options, x_T)
            with self.unet.cache_context():  # the text's keys and values once, not once per step
                latents.append(sample_fn(model_fn, x_T, self.schedule, noise_fn=noise_fn, callback=step_callback,
                                         progress=progress, **options))
        z0 = torch.cat(latents)
        images = torch.cat([self.model.decode_latents(z) for z in z0.split(batch_size)])
        return GenerationResult(images=images, latents=z0, prompts=all_prompts, seeds=seeds)


def _with_before_step(before_step: BeforeStep, callback: Callable | None, sampler: str, schedule, options: dict,
                      x_T: Tensor) -> tuple[Tensor, Callable]:
    """z_T changed for step 0, and a sampler callback that changes z_t before each later step."""
    timesteps = sampler_timesteps(sampler, schedule, **options).to(x_T.device)  # (N,): what the model will see
    x_T = before_step(0, timesteps[0:1], x_T)

    def step_callback(info: dict[str, Any]) -> Tensor:
        x = info["x"]
        if callback is not None:
            replaced = callback(info)
            x = x if replaced is None else replaced
        i = info["i"] + 1
        if i < len(timesteps):
            x = before_step(i, timesteps[i : i + 1], x)
        return x

    return x_T, step_callback


__all__ = ["GenerationResult", "LatentDiffusionPipeline", "SAMPLERS"]
