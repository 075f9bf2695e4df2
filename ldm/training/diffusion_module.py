"""Stage 2: train the U-Net of a LatentDiffusion model on latents of its frozen autoencoder, conditioned by its
frozen conditioner.

    image ─ model.encode_images (frozen autoencoder, ×scale_factor) ─ z0 ─ add noise at t ─ z_t ─┐
    caption ─ ("" with probability ucg_rate) ─ model.encode_text (frozen) ─ context, mask ─ U-Net(z_t, t, ·) ─ loss

The module takes the model in (ldm.model.LatentDiffusion, no Lightning inside) and adds what training needs: the
loss, an EMA copy of the U-Net, the optimizer and its schedule, LoRA adapters, non-finite handling and logging.
Only the U-Net trains (and the text encoder when asked). Checkpoints carry the U-Net, its EMA, the autoencoder and
the trainable conditioner parts, never the frozen text encoder (it is rebuilt from its config).
"""

from __future__ import annotations

import logging
import math
import os
import random
from contextlib import contextmanager, nullcontext

import hydra
import lightning as L
import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from ldm.config_values import plain
from ldm.diffusion.objectives import diffusion_loss, sample_offset_noise
from ldm.model import LatentDiffusion, split_settings
from ldm.model_parts import SourceWeights
from ldm.modules.lora import LoRASettings, add_lora
from ldm.modules.unet import UNetModel
from ldm.training.divergence import resume_advice
from ldm.training.ema import EMA, clean_name
from ldm.training.gradients import clip_and_measure, fsdp_root
from ldm.training.lr_schedule import build_lr_scheduler
from ldm.training.rng import rng_state, sample_generators, set_rng_state

log = logging.getLogger(__name__)

NOISE_SEEDINGS = ("global", "per_sample")


class DiffusionModule(L.LightningModule):
    """Trains a LatentDiffusion ``model``'s U-Net (and its text encoder with train_conditioner or lora.text_encoder).

    ema: EMA arguments (decay, start_step, update_every, warmup), or None for no EMA.
    optimizer: a Hydra config of a partial optimizer (``_partial_: true``) that takes the parameters.
    lr_schedule: build_lr_scheduler arguments (kind, warmup_steps, min_lr_ratio).
    ucg_rate: probability of replacing a caption by "" so classifier-free guidance works at sampling time.
    min_snr_gamma, offset_noise: the loss's weighting and noise (ldm.diffusion.objectives).
    sample_posterior: z0 drawn from the autoencoder's posterior (else its mean).
    nonfinite_loss: "raise" stops the run on a NaN/inf loss; "skip" drops that batch's update (on every rank
        together when any rank's loss is non-finite, so data-parallel ranks stay in step).
    noise_seeding: "global" draws t, noise, posterior noise and caption dropout from the global RNG; "per_sample"
        draws them for each sample from a generator seeded by (seed, sample key, step), so a run does not depend
        on how its batches are split over ranks (1 GPU × batch 64 = 8 GPUs × batch 8).
    lora: LoRASettings fields (or true for the defaults): adapters on the U-Net's attention projections (and on
        the text encoder with ``text_encoder: true``); then only the adapters train.
    train_conditioner: train the text encoder with the U-Net (DreamBooth's train_text_encoder); with LoRA on, it
        means adapters in the text encoder rather than its full weights.
    compile: torch.compile the U-Net's forward (in place: state-dict keys keep their names); a dict gives
        torch.compile's arguments. Not saved: it belongs to a run, not to the weights.
    """

    requires_source = False  # DreamBooth: fine-tuning needs init_from

    def __init__(self, model: LatentDiffusion, ema: dict | None = None, optimizer: dict | None = None,
                 lr_schedule: dict | None = None, ucg_rate: float = 0.1, min_snr_gamma: float | None = None,
                 offset_noise: float = 0.0, sample_posterior: bool = True, nonfinite_loss: str = "raise",
                 noise_seeding: str = "global", lora: dict | bool | None = None, train_conditioner: bool = False,
                 compile: bool | dict = False):
        super().__init__()
        if nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"nonfinite_loss must be 'raise' or 'skip', got {nonfinite_loss!r}")
        if noise_seeding not in NOISE_SEEDINGS:
            raise ValueError(f"noise_seeding must be one of {NOISE_SEEDINGS}, got {noise_seeding!r}")
        lora = LoRASettings.parse(plain(lora))
        if lora.enabled:
            # After the weights are loaded, before the EMA copy: adapters start at zero (the loaded model), and
            # from here on only they train.
            model.add_lora(lora, text_encoder=train_conditioner or lora.text_encoder)
        # The model, unregistered, and its parts under the names checkpoints have always had (unet.*,
        # autoencoder.*, conditioner.*), so that nothing is registered twice.
        object.__setattr__(self, "model", model)
        self.unet, self.autoencoder, self.conditioner, self.schedule = (model.unet, model.autoencoder,
                                                                         model.conditioner, model.schedule)
        self.ema = EMA(self.unet, **plain(ema)) if ema else None
        self.save_hyperparameters({
            **model.config(), "ema": plain(ema), "optimizer": plain(optimizer), "lr_schedule": plain(lr_schedule),
            "ucg_rate": ucg_rate, "min_snr_gamma": min_snr_gamma, "offset_noise": offset_noise,
            "sample_posterior": sample_posterior, "nonfinite_loss": nonfinite_loss, "noise_seeding": noise_seeding,
            "train_conditioner": train_conditioner, "lora": lora.as_dict() if lora.enabled else None})
        self.skipped_nonfinite = 0
        self._uncond_context: tuple[torch.Tensor, torch.Tensor] | None = None
        self._skip_update = False
        object.__setattr__(self, "_gathered_unet", None)  # see sampling_weights: never a submodule
        self.register_load_state_dict_pre_hook(DiffusionModule._fill_frozen_conditioner)
        if compile:
            # In place, after the EMA copy: the module keeps its parameter names (no "_orig_mod." prefix), so
            # checkpoints, resume and the EMA are the same with and without compilation.
            self.unet.compile(**(plain(compile) if isinstance(plain(compile), dict) else {}))

    @classmethod
    def from_settings(cls, settings: dict, source: SourceWeights | None = None) -> DiffusionModule:
        """The module a run's flat ``model`` config describes: the LatentDiffusion model of its model settings
        (from imported weights with ``source``: init_from), handed in with the rest, training's settings."""
        if cls.requires_source and source is None:
            raise ValueError("DreamBooth fine-tunes a trained model: set init_from=PATH (a diffusers folder, a Stable "
                             "Diffusion single file or a stage-2 checkpoint)")
        model_settings, training = split_settings(settings)
        lora = LoRASettings.parse(training.get("lora"))
        trainable = bool(training.get("train_conditioner")) or (lora.enabled and lora.text_encoder)
        model = LatentDiffusion.from_config(**model_settings, source=source, trainable_conditioner=trainable)
        return cls(model, **training)

    @property
    def prediction_type(self) -> str:
        return self.model.prediction_type

    # -- frozen parts -----------------------------------------------------------------------------------------

    @property
    def conditioner_frozen(self) -> bool:
        return self.model.conditioner_frozen

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.train(mode)  # frozen parts stay in eval mode whatever the trainer asks
        return self

    def fsdp_ignored_modules(self) -> list[nn.Module]:
        """What FSDP (trainer=fsdp) leaves whole on every rank: the parts without gradients and the EMA copy."""
        modules: list[nn.Module] = [self.autoencoder]
        if self.conditioner_frozen:
            modules.append(self.conditioner)
        if self.ema is not None:
            modules.append(self.ema)
        return modules

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.conditioner_frozen:
            # The frozen encoder is rebuilt from its config (or its pretrained file) on load: not trainable state.
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith("conditioner.")}
        # Every rank's RNG state (each rank draws its own noise), so that a resumed run draws what this one would.
        checkpoint["rng_states"] = self._from_all_ranks(rng_state())

    def _fill_frozen_conditioner(self, state_dict: dict, prefix: str, *args) -> None:
        # Checkpoints do not store the frozen conditioner: loading takes its rebuilt weights. A hook rather than
        # on_load_checkpoint alone, because FSDP's resume loads the state dict before calling that.
        if self.conditioner_frozen:
            for k, v in self.conditioner.state_dict(prefix=f"{prefix}conditioner.").items():
                state_dict.setdefault(k, v)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict")  # FSDP's resume has loaded (and removed) it already
        if self.conditioner_frozen and state is not None:
            for k, v in self.conditioner.state_dict(prefix="conditioner.").items():
                state.setdefault(k, v)
        # Applied just before the first training step after resuming: data loading set-up draws from the RNG too.
        self._resumed_rng_states = checkpoint.get("rng_states")

    # -- ranks ------------------------------------------------------------------------------------------------

    def _from_all_ranks(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...]; every rank must call this (a collective)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return [obj]
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value, reduce_op="sum")

    def on_fit_start(self) -> None:
        # train.py seeds every rank alike; give each rank its own stream so that ranks draw different t, noise
        # and caption dropout for their different samples (a resumed run then restores each rank's state).
        if self.trainer.world_size > 1:
            seed = (int(os.environ.get("PL_GLOBAL_SEED", 0)) + 1_000_003 * self.global_rank) % 2**32
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)

    # -- the step ---------------------------------------------------------------------------------------------

    def sample_generators(self, batch: dict) -> list[torch.Generator] | None:
        """With noise_seeding="per_sample", one generator per sample seeded by (run seed, step, sample key);
        else None: draws come from the global RNG."""
        if self.hparams.get("noise_seeding", "global") != "per_sample":
            return None
        if "key" not in batch:
            raise ValueError("model.noise_seeding=per_sample needs a 'key' for every sample of a batch")
        return sample_generators(list(batch["key"]), os.environ.get("PL_GLOBAL_SEED", 0), self.global_step)

    def encode_images(self, images: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """z0 of images: the posterior sampled (sample_posterior) and scaled (the model's encode_images)."""
        return self.model.encode_images(images, self.hparams.sample_posterior, generators)

    def batch_latents(self, batch: dict, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """z0 (B, C, h, w): encoded from batch["image"], or from cached posteriors batch["latent"] (the mean,
        unscaled) and batch["latent_std"] (see ldm.data.cache_latents)."""
        if "latent" in batch:
            return self.model.sample_latents(batch["latent"].to(self.device), batch.get("latent_std"),
                                             self.hparams.sample_posterior, generators)
        return self.encode_images(batch["image"], generators)

    def drop_flags(self, n: int, generators: list[torch.Generator] | None = None) -> list[bool]:
        """Which of n captions become "" (probability ucg_rate, training only)."""
        rate = self.hparams.ucg_rate
        if not self.training or rate <= 0:
            return [False] * n
        if generators is None:
            return [random.random() < rate for _ in range(n)]
        return [bool(torch.rand((), generator=g) < rate) for g in generators]

    def empty_context(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The context of "" (1, length, d) under the padding rule: what a dropped caption conditions on."""
        if self._uncond_context is None or not self.conditioner_frozen:
            self._uncond_context = self.model.encode_text([""])
        context, mask = self._uncond_context
        return self.model.pad_contexts(context, mask, length // self.conditioner.tokens_per_chunk)

    def batch_context(self, batch: dict, generators: list[torch.Generator] | None = None):
        """(context (B, L, d), mask (B, L)) of the captions after dropout, or of cached text embeddings
        (batch["context"], batch["mask"]) with the dropped rows replaced by the context of "": the same contexts
        either way (the model's padding rule)."""
        n = len(batch["caption"]) if "caption" in batch else batch["context"].shape[0]
        drop = self.drop_flags(n, generators)
        if "context" not in batch:
            return self.model.encode_text(["" if d else c for c, d in zip(batch["caption"], drop)])
        context, mask = self.model.cached_contexts(batch["context"], batch["mask"])
        if any(drop):
            uncond, uncond_mask = self.empty_context(context.shape[1])
            rows = torch.tensor(drop, device=self.device)
            context = torch.where(rows[:, None, None], uncond.to(context.dtype), context)
            mask = torch.where(rows[:, None], uncond_mask, mask)
        return context, mask

    def training_loss(self, batch: dict, reduction: str = "mean") -> tuple[torch.Tensor, dict]:
        """The denoising loss of a batch of images or cached latents (and captions or cached contexts); with
        reduction="none" the per-sample losses (B,) float32, for losses that weigh parts of a batch."""
        generators = self.sample_generators(batch)
        z0 = self.batch_latents(batch, generators)  # (B, C, h, w)
        context, mask = self.batch_context(batch, generators)
        t = noise = None
        if generators is not None:
            t = torch.cat([self.schedule.sample_timesteps(1, generator=g, device="cpu") for g in generators])
            noise = torch.cat([sample_offset_noise(z0[i : i + 1], self.hparams.offset_noise, g)
                               for i, g in enumerate(generators)])
        return diffusion_loss(
            lambda x_t, tt: self.unet(x_t, tt, context, mask),
            z0,
            self.schedule,
            prediction_type=self.prediction_type,
            min_snr_gamma=self.hparams.min_snr_gamma,
            offset_noise=self.hparams.offset_noise,
            t=t,
            noise=noise,
            reduction=reduction,
        )

    def training_step(self, batch: dict, batch_idx: int):
        loss, stats = self.training_loss(batch)
        # Decided on all ranks together: a rank that skipped (or stopped) alone would leave the others waiting
        # in the gradient all-reduce.
        nonfinite_ranks = int(self._sum_over_ranks((~torch.isfinite(loss.detach())).float()).item())
        if nonfinite_ranks:
            where = (f"loss {loss.item()}" if not torch.isfinite(loss) else "loss on another rank") + \
                f" at step {self.global_step} (batch keys: {list(batch.get('key', []))[:4]})"
            message = f"non-finite {where}"
            if self.hparams.nonfinite_loss == "raise":
                raise FloatingPointError(f"{message}. {resume_advice(self.trainer, self)}, or set "
                                         "model.nonfinite_loss=skip to drop such batches")
            self.skipped_nonfinite += 1
            log.warning("%s: update skipped on every rank (%d so far)", message, self.skipped_nonfinite)
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), batch_size=1)
            # Backward still runs on every rank (Lightning refuses a None loss in distributed training, and DDP
            # and FSDP expect every rank's gradients); optimizer_step then drops the gradients unused.
            self._skip_update = True
            # The flag tells the divergence guard (ldm.training.divergence) that this step did not count.
            return {"loss": torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0), "skipped_nonfinite": True}
        b = stats["mse"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/mse", stats["mse"].mean(), batch_size=b)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        z0 = self.batch_latents(batch)
        context, mask = self.batch_context(batch)
        # A fixed generator: the validation loss compares checkpoints on the same t and noise.
        g = torch.Generator(device="cpu").manual_seed(batch_idx)
        t = torch.randint(0, self.schedule.num_timesteps, (z0.shape[0],), generator=g).to(self.device)
        noise = torch.randn(z0.shape, generator=g).to(z0)
        unet = self.ema.model if self.ema is not None else self.unet
        loss, _ = diffusion_loss(lambda x_t, tt: unet(x_t, tt, context, mask), z0, self.schedule,
                                 prediction_type=self.prediction_type, t=t, noise=noise)
        self.log("val/loss", loss, batch_size=z0.shape[0], sync_dist=True, prog_bar=True)

    # -- optimisation -----------------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        # requires_grad tells: with LoRA only the adapters of the U-Net (and text encoder) have it.
        params = [p for p in self.unet.parameters() if p.requires_grad]
        if not self.conditioner_frozen:
            params += [p for p in self.conditioner.parameters() if p.requires_grad]
        return params

    def configure_optimizers(self):
        config = self.hparams.optimizer or {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4}
        try:
            optimizer = hydra.utils.instantiate(config)(self.trainable_parameters())
        except TypeError as e:
            # The defaults (fused, betas, eps) are AdamW's: an optimizer swapped in by _target_ may not take them.
            raise ValueError(f"model.optimizer: {config.get('_target_')} does not accept these arguments ({e}); "
                             "remove the ones it does not take, e.g. ~model.optimizer.fused") from e
        config = dict(self.hparams.lr_schedule or {})
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else None
        total = None if total is None or math.isinf(total) else int(total)
        scheduler = build_lr_scheduler(optimizer, total_steps=total, **config)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        def closure():
            result = optimizer_closure()  # training_step and backward
            if self._skip_update:
                self._skip_update = False
                # Parameters without a gradient are left alone by torch's optimizers: no step, no momentum, no
                # weight decay. Every rank does this together (the decision was summed over ranks).
                for p in self.trainable_parameters():
                    p.grad = None
            return result

        optimizer.step(closure=closure)
        # The EMA follows each optimizer step here, before any callback sees the step's end: a checkpoint
        # written at this step (ModelCheckpoint runs in on_train_batch_end) holds the EMA of these weights,
        # and a run resumed from it makes the same updates as one never interrupted.
        if self.ema is not None:
            fsdp = fsdp_root(self._trainer)
            # Under FSDP the U-Net holds shards between steps: gather the full weights (all ranks) to average.
            with FullyShardedDataParallel.summon_full_params(fsdp, writeback=False) if fsdp else nullcontext():
                # Lightning counts the step as completed once this hook returns: this update is step global_step + 1.
                self.ema.update(self.unet, self.global_step + 1)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning calls this after every backward pass that ends in an optimizer step, with or without clipping.
        norm = clip_and_measure(self.trainer, optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.log("train/grad_norm", norm, batch_size=1)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        states = getattr(self, "_resumed_rng_states", None)
        if states:
            self._resumed_rng_states = None
            if len(states) != self.trainer.world_size:
                log.warning("the checkpoint holds RNG states of %d ranks, this run has %d: ranks reuse them",
                            len(states), self.trainer.world_size)
            set_rng_state(states[self.global_rank % len(states)])

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=1, prog_bar=True)

    # -- inference --------------------------------------------------------------------------------------------

    def sampling_unet(self, use_ema: bool = True) -> UNetModel:
        if self._gathered_unet is not None:
            return self._gathered_unet
        return self.ema.model if (use_ema and self.ema is not None) else self.unet

    def sampling_model(self, use_ema: bool = True) -> LatentDiffusion:
        """The model with the U-Net to sample from (the EMA copy by default); every part is shared, not copied.
        What LatentDiffusionPipeline.from_module samples with."""
        return self.model.with_unet(self.sampling_unet(use_ema))

    @contextmanager
    def sampling_weights(self, use_ema: bool = True):
        """Within it, ``sampling_unet(use_ema)`` is a whole network on every rank. Under trainer=fsdp the trained
        U-Net holds only this rank's shards between steps; with no EMA copy to sample from (the EMA stays whole),
        its gathered weights go into a temporary unsharded copy. Gathering is a collective: every rank enters,
        whether it samples or not."""
        fsdp = fsdp_root(self._trainer)
        if fsdp is None or (use_ema and self.ema is not None):
            yield
            return
        with torch.device("meta"):
            copy = UNetModel(**self.hparams.unet)
        lora = LoRASettings.parse(self.hparams.get("lora"))
        if lora.enabled:
            add_lora(copy, lora.rank, lora.alpha, lora.dropout, lora.target_modules, "U-Net (sampling copy)")
        with FullyShardedDataParallel.summon_full_params(fsdp, writeback=False):
            # Names as EMA.update maps them: without the wrappers' prefixes.
            state = {clean_name(k): v.detach().clone() for k, v in [*self.unet.named_parameters(),
                                                                    *self.unet.named_buffers()]}
        copy.load_state_dict(state, strict=True, assign=True)
        object.__setattr__(self, "_gathered_unet", copy.requires_grad_(False).eval())
        try:
            yield
        finally:
            object.__setattr__(self, "_gathered_unet", None)
