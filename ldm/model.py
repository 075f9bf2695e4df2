"""The whole latent diffusion model as one object, with no Lightning in it.

    LatentDiffusion
      unet             UNetModel: (z_t, t, context, mask) → the prediction (eps | v | x0)
      autoencoder      AutoencoderKL, frozen: image (B, 3, H, W) ↔ latent (B, c, H/f, W/f), × scale_factor
      conditioner      captions → context (B, 77·n, d), mask (B, 77·n)  (open_clip text, or class labels)
      schedule         NoiseSchedule: betas, ᾱ_t
      prediction_type, scale_factor, sampling (defaults for generation: sampler, steps, guidance, image size)

Training (ldm.training.DiffusionModule), sampling (ldm.pipeline), the editing tools (ldm.editing), export and
conversion all use this one object. It is built from a run's settings (`from_config`, optionally starting from
imported weights: `SourceWeights`, see `read_source`) or from a file (`from_source`: a stage-2 checkpoint of this
framework, its export, a diffusers folder, a Stable Diffusion single file). Its state dict keys (unet.*,
autoencoder.*, conditioner.*) are those of the stage-2 checkpoints: a checkpoint's state dict, less its EMA copy
(ema.model.*), is this model's.

Contexts follow one padding rule wherever they come from (live captions, cached text embeddings, dropped
captions, negative prompts): a context shorter than the batch's longest is padded with the encoding of the empty
chunk (BOS, EOS, padding), masked unless the conditioner attends to padding (``use_mask=False``, what the original
SD U-Nets saw in training).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ldm.config_values import plain
from ldm.diffusion.objectives import normalize_prediction_type
from ldm.diffusion.schedule import NoiseSchedule
from ldm.model_io import load_source, read_source
from ldm.model_parts import SourceWeights, build_conditioner, load_autoencoder
from ldm.modules.autoencoder import AutoencoderKL, draw_latent, saved_config
from ldm.modules.lora import LoRASettings, add_lora
from ldm.modules.unet import UNetModel
from ldm.weights_io import CheckpointError

log = logging.getLogger(__name__)

AUTOENCODER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The settings `from_config` takes: what a run's `model` config holds besides training (see split_settings).
SETTINGS = ("unet", "conditioner", "conditioner_seed", "schedule", "prediction_type", "scale_factor",
            "autoencoder_ckpt", "autoencoder", "autoencoder_precision", "sampling")


def split_settings(settings: dict) -> tuple[dict, dict]:
    """A run's flat ``model`` config → (the model's settings, the rest: training's)."""
    settings = {k: plain(v) for k, v in settings.items() if k not in ("_target_", "_recursive_")}
    return ({k: v for k, v in settings.items() if k in SETTINGS},
            {k: v for k, v in settings.items() if k not in SETTINGS})


class LatentDiffusion(nn.Module):
    def __init__(self, unet: UNetModel, autoencoder: AutoencoderKL, conditioner: nn.Module, schedule: NoiseSchedule,
                 prediction_type: str = "eps", scale_factor: float = 1.0, config: dict | None = None,
                 sampling: dict | None = None):
        """The parts, built. ``config``: the settings that rebuild them (saved with checkpoints); ``sampling``:
        defaults for generation, e.g. {"image_size": 32, "steps": 50, "cfg_scale": 3.0, "prompts": [...]}."""
        super().__init__()
        self.unet = unet
        self.autoencoder = autoencoder
        self.conditioner = conditioner
        self.schedule = schedule
        self.prediction_type = normalize_prediction_type(prediction_type)
        self.autoencoder.scale_factor = float(scale_factor)
        self.settings = dict(config or {})
        self.sampling = dict(sampling or {})

    # -- building ---------------------------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        unet: dict,
        conditioner: dict,
        schedule: dict | None = None,
        autoencoder_ckpt: str | os.PathLike | None = None,
        autoencoder: dict | None = None,
        scale_factor: float | None = None,
        prediction_type: str = "eps",
        conditioner_seed: int = 0,
        autoencoder_precision: str = "fp32",
        sampling: dict | None = None,
        source: SourceWeights | None = None,
        trainable_conditioner: bool = False,
    ) -> LatentDiffusion:
        """The model a run's settings describe.

        unet: UNetModel arguments. conditioner: a Hydra config with ``_target_`` (text or class labels).
        schedule: NoiseSchedule arguments. autoencoder_ckpt: the frozen stage-1 autoencoder (see
        ldm.model_parts.load_autoencoder); ``autoencoder`` (its config) is filled in from it and saved, so a
        stage-2 checkpoint alone rebuilds the model. scale_factor: multiplies latents; None takes 1/std measured
        in stage 1 (else the autoencoder's own). autoencoder_precision: "fp32" | "bf16" | "fp16", the dtype the
        frozen autoencoder runs in (fp16 VAEs are known to overflow to NaN). source: imported weights to start
        from (``init_from``): they decide the U-Net's architecture (the run keeps its runtime choices), the
        autoencoder (unless autoencoder_ckpt is given), the text encoder, the prediction type and the schedule
        where they hold them, and give their weights. trainable_conditioner: the text encoder's trainable
        variant (fine-tuning it, or adapters in it)."""
        if autoencoder_precision not in AUTOENCODER_DTYPES:
            raise ValueError(f"autoencoder_precision must be one of {tuple(AUTOENCODER_DTYPES)}, "
                             f"got {autoencoder_precision!r}")
        unet, conditioner, schedule, autoencoder, sampling = map(plain, (unet, conditioner, schedule or {},
                                                                         autoencoder, sampling))
        if source is not None:
            differs = source.differing_unet_keys(unet)
            if differs:
                log.info("init_from: the U-Net architecture comes from %s (differs from the experiment's model.unet "
                         "in %s)", source.source, ", ".join(differs))
            unet = source.unet_kwargs(unet)
            if source.conditioner_config is not None:
                conditioner = source.conditioner_config
                conditioner_seed = conditioner_seed if source.conditioner_seed is None else source.conditioner_seed
            schedule = {**schedule, **(source.schedule_config or {})}
            prediction_type = source.prediction_type or prediction_type
            if autoencoder_ckpt is None:
                if source.autoencoder_config is None:
                    raise ValueError(f"init_from {source.source} holds no autoencoder: set autoencoder.ckpt_path=PATH")
                autoencoder = source.autoencoder_config  # its scale_factor comes with it
        latent_std = None
        if autoencoder_ckpt is not None:
            vae, autoencoder, latent_std = load_autoencoder(autoencoder_ckpt)
            log.info("autoencoder loaded from %s and frozen", autoencoder_ckpt)
        elif autoencoder is not None:
            # A saved config: its weights come with the checkpoint being loaded (or from init_from).
            autoencoder = saved_config(autoencoder)
            vae = AutoencoderKL(**autoencoder)
        else:
            raise ValueError("stage 2 needs the stage-1 autoencoder: set autoencoder.ckpt_path=PATH")
        if scale_factor is None:
            scale_factor = 1.0 / latent_std if latent_std else vae.scale_factor
        log.info("latent scale_factor = %.5f", scale_factor)
        config = dict(unet=unet, conditioner=conditioner, conditioner_seed=conditioner_seed, schedule=schedule,
                      autoencoder=autoencoder, scale_factor=float(scale_factor), prediction_type=prediction_type,
                      autoencoder_precision=autoencoder_precision)
        model = cls(UNetModel(**unet), vae.requires_grad_(False).eval().to(AUTOENCODER_DTYPES[autoencoder_precision]),
                    build_conditioner(conditioner, conditioner_seed, trainable=trainable_conditioner),
                    NoiseSchedule(**schedule), prediction_type, scale_factor, config=config, sampling=sampling)
        if source is not None:
            model.load_source(source, load_autoencoder=autoencoder_ckpt is None)
        return model

    def load_source(self, source: SourceWeights, load_autoencoder: bool = True) -> None:
        self.unet.load_state_dict(source.unet_state, strict=True)
        if load_autoencoder:
            self.autoencoder.load_state_dict(source.autoencoder_state, strict=True)
        if source.conditioner_state is not None:
            self.conditioner.load_state_dict(source.conditioner_state, strict=True)
        if self.conditioner.output_dim != self.unet.context_dim:
            raise ValueError(f"init_from {source.source}: the U-Net's context_dim is {self.unet.context_dim} but the "
                             f"conditioner gives {self.conditioner.output_dim}-wide contexts (model.conditioner does "
                             "not fit these weights)")
        log.info("initialised from %s", source.source)

    def config(self) -> dict:
        """The settings that rebuild this model with `from_config` (``autoencoder`` in place of a file), and its
        sampling defaults: what checkpoints store as hyperparameters."""
        return {**self.settings, "sampling": dict(self.sampling)}

    @classmethod
    def from_checkpoint(cls, ckpt: dict, use_ema: bool = True, source: str = "checkpoint") -> LatentDiffusion:
        """A stage-2 checkpoint of this framework (or its export), loaded: {"hyper_parameters", "state_dict"}.
        use_ema: the U-Net's weights from the EMA copy where the checkpoint has one. Checkpoints of runs with
        LoRA adapters (or a trained text encoder) rebuild those parts as the run had them."""
        hparams = dict(ckpt.get("hyper_parameters") or {})
        if "unet" not in hparams or "autoencoder" not in hparams:
            raise CheckpointError(f"{source} is not a stage-2 (text-to-image) checkpoint of this framework")
        settings = {k: hparams[k] for k in SETTINGS if k in hparams and k != "autoencoder_ckpt"}
        lora = LoRASettings.parse(hparams.get("lora"))
        trainable = bool(hparams.get("train_conditioner")) or (lora.enabled and lora.text_encoder)
        model = cls.from_config(**settings, trainable_conditioner=trainable)
        if lora.enabled:
            model.add_lora(lora, text_encoder=trainable)
        state = dict(ckpt["state_dict"])
        ema = {k[len("ema.model."):]: v for k, v in state.items() if k.startswith("ema.model.")}
        if use_ema and ema:
            state.update({f"unet.{k}": v for k, v in ema.items()})
        # The frozen conditioner is not stored: it is rebuilt from its config (or its weights file).
        for key, value in model.conditioner.state_dict(prefix="conditioner.").items():
            state.setdefault(key, value)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("ema.") and k != "latent_std"},
                              strict=True)
        model.used_ema = bool(use_ema and ema)
        return model.eval()

    @classmethod
    def from_source(cls, path: str | os.PathLike, use_ema: bool = True, device: str | torch.device = "cpu"
                    ) -> LatentDiffusion:
        """A model to sample from: a stage-2 checkpoint of this framework, its export (``python -m ldm.export``),
        a diffusers folder or a Stable Diffusion single file. use_ema: the EMA U-Net where the file has one."""
        return load_source(cls, path, use_ema).to(device).eval()

    @classmethod
    def read_source(cls, path: str | os.PathLike, out_dir: str | os.PathLike, use_ema: bool = True) -> SourceWeights:
        """What a run started from ``path`` takes (``init_from``; see ldm.model_io.read_source)."""
        return read_source(cls, path, out_dir, use_ema)

    def add_lora(self, settings: LoRASettings, text_encoder: bool = False) -> None:
        """Adapters on the U-Net's attention projections (and the text encoder's): W + (alpha/rank)·BA, B = 0."""
        add_lora(self.unet, settings.rank, settings.alpha, settings.dropout, settings.target_modules, "U-Net")
        if text_encoder:
            add_lora(self.conditioner.text, settings.rank, settings.alpha, settings.dropout,
                     settings.text_encoder_target_modules, "text encoder")
        log.info("LoRA (rank %d, alpha %g): %d trainable parameters", settings.rank, settings.alpha,
                 sum(p.numel() for p in self.parameters() if p.requires_grad))

    def with_unet(self, unet: UNetModel) -> LatentDiffusion:
        """The same model with another U-Net (the EMA copy, a gathered FSDP copy); every other part is shared."""
        return LatentDiffusion(unet, self.autoencoder, self.conditioner, self.schedule, self.prediction_type,
                               self.scale_factor, self.settings, self.sampling)

    # -- what it is ---------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def scale_factor(self) -> float:
        return float(self.autoencoder.scale_factor)

    @property
    def conditioner_frozen(self) -> bool:
        return bool(self.conditioner.frozen)

    @property
    def downsampling_factor(self) -> int:
        """Image sizes must be multiples of this: the autoencoder's downsampling times the U-Net's."""
        return self.autoencoder.downsampling_factor * self.unet.downsampling_factor

    @property
    def image_size(self) -> int | None:
        """The image size it was trained at (its default for sampling), where known."""
        size = self.sampling.get("image_size")
        return None if size is None else int(size)

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        # Frozen parts stay in eval mode whatever is asked (no dropout, fixed normalisation).
        self.autoencoder.eval()
        if self.conditioner_frozen:
            self.conditioner.eval()
        return self

    # -- images ↔ latents ---------------------------------------------------------------------------------------

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor | None, sample_posterior: bool = True,
                       generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """z0 from a posterior q(z|x) given by its mean and std (cached latents): a draw (its mean without
        sample_posterior), scaled. The same draw as encode_images makes from images."""
        z = draw_latent(mean, std, generators) if sample_posterior and std is not None else mean.float()
        return z * self.scale_factor

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample_posterior: bool = True,
                      generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → scaled latents z0 (B, c, H/f, W/f) float32."""
        # The autoencoder runs in its own precision (autoencoder_precision), never under a caller's autocast.
        with torch.autocast(images.device.type, enabled=False):
            return self.autoencoder.encode_to_latent(images, sample_posterior, generators)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images (B, 3, H, W), clamped to [-1, 1]."""
        return self.autoencoder.decode_from_latent(z).clamp(-1, 1)

    # -- text → contexts (one padding rule) -----------------------------------------------------------------

    def encode_text(self, captions: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, 77·n, d), mask (B, 77·n)) on the model's device, padded to the longest caption of the
        batch. No autograd graph through a frozen conditioner."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.conditioner_frozen):
            context, mask = self.conditioner(list(captions))
        return context.to(self.device), mask.to(self.device)

    def pad_contexts(self, context: torch.Tensor, mask: torch.Tensor, chunks: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The padding rule: ``chunks`` chunks, the added ones the encoding of the empty chunk."""
        return self.conditioner.pad_to_chunks(context, mask, chunks)

    def guidance_contexts(self, prompts: list[str], negatives: list[str] | None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Contexts of the prompts and of their negatives (or of ""), padded to the same number of chunks."""
        context, mask = self.encode_text(prompts)
        if negatives is None:
            return context, mask, None, None
        uncond, uncond_mask = self.encode_text(negatives)
        chunks = max(context.shape[1], uncond.shape[1]) // self.conditioner.tokens_per_chunk
        context, mask = self.pad_contexts(context, mask, chunks)
        uncond, uncond_mask = self.pad_contexts(uncond, uncond_mask, chunks)
        return context, mask, uncond, uncond_mask

    def cached_contexts(self, context: torch.Tensor, mask: torch.Tensor, drop: list[bool] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached text embeddings (ldm.data.cache_latents) as `encode_text` gives the same captions: batching
        pads shorter contexts with masked zeros (a chunk with no position attended, not even its BOS), which
        become the empty chunk's encoding under the padding rule; rows in ``drop`` become the context of ""."""
        context, mask = context.to(self.device), mask.to(self.device)
        tokens = self.conditioner.tokens_per_chunk
        chunks = context.shape[1] // tokens
        real = mask.view(mask.shape[0], chunks, tokens).any(dim=-1)  # (B, chunks)
        counts = real.sum(dim=1).tolist()
        drop = drop or [False] * context.shape[0]
        if all(n == chunks for n in counts) and not any(drop):
            return context, mask
        rows, row_masks = [], []
        empty = None
        for i, (n, dropped) in enumerate(zip(counts, drop)):
            if dropped:
                if empty is None:
                    empty = self.encode_text([""])
                row, row_mask = empty
            else:
                row, row_mask = context[i : i + 1, : n * tokens], mask[i : i + 1, : n * tokens]
            row, row_mask = self.pad_contexts(row.to(context.dtype), row_mask, chunks)
            rows.append(row)
            row_masks.append(row_mask)
        return torch.cat(rows), torch.cat(row_masks)
