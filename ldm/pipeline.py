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

from ldm.config_checks import check_generation_options
from ldm.diffusion.guidance import cfg_model_fn
from ldm.diffusion.samplers import SAMPLERS, get_sampler
from ldm.diffusion.schedule import NoiseSchedule
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.unet import UNetModel
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
        """A stage-2 checkpoint of this framework, its export (``python -m ldm.export``), or imported weights
        (a diffusers folder or a Stable Diffusion single file, see ``from_pretrained``)."""
        from ldm.export import export_weights_path, load_export
        from ldm.training.init_from import load_diffusion_module, source_kind

        if export_weights_path(path) is not None:  # inference-only weights written by `python -m ldm.export`
            kind, ckpt = "stage2", load_export(path)
        else:
            kind, ckpt = source_kind(path, "checkpoint")
        if kind != "stage2":
            return cls.from_pretrained(path, kind=kind, use_ema=use_ema, device=device)
        module = load_diffusion_module(ckpt, path)
        if use_ema and module.ema is None:
            use_ema = False
        return cls.from_module(module.to(device).eval(), use_ema=use_ema)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, kind: str | None = None, use_ema: bool = True, device: str | torch.device = "cpu"
    ) -> "LatentDiffusionPipeline":
        """Imported weights: a diffusers pipeline folder or a Stable Diffusion single file (ldm.convert).

        The prediction type and schedule come from the source where it says (diffusers' scheduler config),
        else SD's (eps, scaled_linear). image_size: the U-Net's ``sample_size`` (diffusers) times the
        autoencoder's downsampling, else 64 latents (512 px for SD1/SD2). use_ema: a single file's EMA U-Net
        (model_ema.*) where it has one.
        """
        from ldm.convert import ConversionError, convert
        from ldm.training.init_from import native_latent_size, single_file_has_ema

        path = Path(path).expanduser()
        kind = kind or ("diffusers" if path.is_dir() else "single_file")
        converted = convert(path, kind=kind, ema=use_ema and kind == "single_file" and single_file_has_ema(path))
        lacking = [name for name, state in (("U-Net", converted.unet_state), ("autoencoder", converted.autoencoder_state),
                                            ("text encoder", converted.conditioner_state)) if state is None]
        if lacking:
            raise ConversionError(f"{path} has no {', '.join(lacking)}; sampling needs the U-Net, the autoencoder "
                                  "and the text encoder")
        parts = converted.build()
        conditioner = parts.build_conditioner()
        return cls(
            parts.unet.to(device),
            parts.autoencoder.to(device),
            conditioner.to(device),
            NoiseSchedule(**(parts.schedule_config or {})),
            parts.prediction_type or "eps",
            image_size=native_latent_size(path, kind) * parts.autoencoder.downsampling_factor,
        )

    # -- adapters ---------------------------------------------------------------------------------------------

    def apply_lora(self, path: str | Path, scale: float = 1.0, merge: bool = False) -> "LatentDiffusionPipeline":
        """Adds the LoRA adapters of an adapter file (``python -m ldm.export_lora``) to this pipeline's U-Net
        (and text encoder), in place, with their update scaled by ``scale`` (0: the base model). ``merge``
        folds them into the weights: the same images, with no extra cost per step."""
        from ldm.modules.lora import LoRAError, add_lora, has_lora, load_lora_state_dict, merge_lora, read_lora

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
        from ldm.modules.lora import set_lora_scale

        set_lora_scale(self.unet, scale)
        if isinstance(getattr(self.conditioner, "text", None), torch.nn.Module):
            set_lora_scale(self.conditioner.text, scale)
        if hasattr(self.conditioner, "clear_cache"):
            self.conditioner.clear_cache()  # cached encodings were made with the previous scale

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
        cfg_scale = self._option(cfg_scale, "cfg_scale", 7.5)
        check_generation_options(n, steps, cfg_scale, eta, guidance_rescale, batch_size)
        cfg_scale = float(cfg_scale)
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
            with self.unet.cache_context():  # the text's keys and values once, not once per step
                z0 = sample_fn(model_fn, x_T, self.schedule, noise_fn=noise_fn, callback=callback,
                               progress=progress, **options)
            latents.append(z0)
        z0 = torch.cat(latents)
        images = torch.cat([self.autoencoder.decode_from_latent(z) for z in z0.split(batch_size)])
        return GenerationResult(images=images.clamp(-1, 1), latents=z0, prompts=all_prompts, seeds=seeds)


__all__ = ["GenerationResult", "LatentDiffusionPipeline", "SAMPLERS"]
