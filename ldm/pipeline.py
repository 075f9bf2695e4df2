"""Text-to-image generation from a trained model: checkpoint → ``generate(prompts, ...)`` → images.

    pipe = LatentDiffusionPipeline.from_checkpoint("runs/emoji_ldm/checkpoints/last.ckpt")
    images = pipe.generate(["glass of milk"], negative_prompt="", n=4, steps=50, cfg_scale=7.5, seed=0)

``sample.py`` and the training callback that logs sample grids both go through this class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ldm.diffusion.guidance import cfg_model_fn
from ldm.diffusion.samplers import SAMPLERS, get_sampler
from ldm.diffusion.schedule import NoiseSchedule
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.unet import UNetModel
from ldm.training.checkpoint import CheckpointError, load_checkpoint
from ldm.training.images import to_pil


@dataclass
class GenerationResult:
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    latents: torch.Tensor  # (N, C, h, w), scaled
    prompts: list[str]  # the prompt of each image
    seeds: list[int]  # the seed of each image

    def pil(self) -> list[Image.Image]:
        return to_pil(self.images)


class LatentDiffusionPipeline:
    def __init__(
        self,
        unet: UNetModel,
        autoencoder: AutoencoderKL,
        conditioner: torch.nn.Module,
        schedule: NoiseSchedule,
        prediction_type: str = "eps",
        image_size: int = 256,
        defaults: dict | None = None,
    ):
        self.unet = unet.eval()
        self.autoencoder = autoencoder.eval()
        self.conditioner = conditioner.eval()
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.image_size = image_size
        self.defaults = dict(defaults or {})

    # -- construction -----------------------------------------------------------------------------------------

    @classmethod
    def from_module(cls, module, use_ema: bool = True) -> "LatentDiffusionPipeline":
        """Share the weights of a (training) DiffusionModule; nothing is copied."""
        sampling = dict(module.hparams.get("sampling") or {})
        return cls(
            module.sampling_unet(use_ema),
            module.autoencoder,
            module.conditioner,
            module.schedule,
            module.prediction_type,
            image_size=int(sampling.pop("image_size", 256)),
            defaults=sampling,
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"
    ) -> "LatentDiffusionPipeline":
        from ldm.training.diffusion_module import DiffusionModule

        ckpt = load_checkpoint(path, "checkpoint")
        hparams = dict(ckpt.get("hyper_parameters") or {})
        if "unet" not in hparams or "autoencoder" not in hparams:
            raise CheckpointError(f"{path} is not a stage-2 (text-to-image) checkpoint of this framework")
        hparams.pop("autoencoder_ckpt", None)
        module = DiffusionModule(**hparams)
        module.on_load_checkpoint(ckpt)  # re-inserts the frozen conditioner's weights
        module.load_state_dict(ckpt["state_dict"], strict=True)
        if use_ema and module.ema is None:
            use_ema = False
        return cls.from_module(module.to(device).eval(), use_ema=use_ema)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # -- conditioning -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], negative_prompts: list[str] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Contexts of the prompts and of their negatives (or of ""), padded to the same number of chunks."""
        context, mask = self.conditioner(prompts)
        if negative_prompts is None:
            return context.to(self.device), mask.to(self.device), None, None
        uncond, uncond_mask = self.conditioner(negative_prompts)
        tokens = getattr(self.conditioner, "tokens_per_chunk", context.shape[1])
        n = max(context.shape[1], uncond.shape[1]) // tokens
        context, mask = self.conditioner.pad_to_chunks(context, mask, n)
        uncond, uncond_mask = self.conditioner.pad_to_chunks(uncond, uncond_mask, n)
        dev = self.device
        return context.to(dev), mask.to(dev), uncond.to(dev), uncond_mask.to(dev)

    # -- generation -------------------------------------------------------------------------------------------

    def _option(self, value, name: str, fallback):
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
    ) -> GenerationResult:
        """``n`` images per prompt. Image i of the whole request starts from noise seeded with ``seed + i``
        and draws its per-step noise from that seed too, so an image does not depend on the batch size or on
        the other prompts of the request."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        steps = int(self._option(steps, "steps", 50))
        sampler_name = self._option(sampler, "sampler", "ddim")
        eta = float(self._option(eta, "eta", 0.0))
        cfg_scale = float(self._option(cfg_scale, "cfg_scale", 7.5))
        size = int(image_size or self.image_size)
        f = self.autoencoder.downsampling_factor
        if size % (f * self.unet.downsampling_factor):
            raise ValueError(f"image_size {size} must be a multiple of {f * self.unet.downsampling_factor}")
        sample_fn = get_sampler(sampler_name)
        options = dict(self.defaults.get("sampler_options") or {})
        options.update(sampler_options or {})
        options["num_steps"] = steps
        options["prediction_type"] = self.prediction_type
        if sampler_name == "ddim":
            options["eta"] = eta

        all_prompts = [p for p in prompts for _ in range(n)]
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        all_negatives = [q for q in negatives for _ in range(n)]
        seeds = [seed + i for i in range(len(all_prompts))]
        shape = (self.unet.in_channels, size // f, size // f)

        latents = []
        for start in range(0, len(all_prompts), batch_size):
            idx = slice(start, start + batch_size)
            batch_prompts, batch_seeds = all_prompts[idx], seeds[idx]
            context, mask, uncond, uncond_mask = self.encode_prompts(
                batch_prompts, all_negatives[idx] if cfg_scale != 1.0 else None
            )
            generators = [torch.Generator().manual_seed(s) for s in batch_seeds]
            x_T = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)

            def noise_fn(i, noise_shape, generators=generators):
                return torch.stack([torch.randn(noise_shape[1:], generator=g) for g in generators])

            model_fn = cfg_model_fn(self.unet, context, mask, uncond, uncond_mask, cfg_scale, guidance_rescale)
            z0 = sample_fn(model_fn, x_T, self.schedule, noise_fn=noise_fn, callback=callback,
                           progress=progress, **options)
            latents.append(z0)
        z0 = torch.cat(latents)
        images = torch.cat([self.autoencoder.decode_from_latent(z) for z in z0.split(batch_size)])
        return GenerationResult(images=images.clamp(-1, 1), latents=z0, prompts=all_prompts, seeds=seeds)


__all__ = ["GenerationResult", "LatentDiffusionPipeline", "SAMPLERS"]
