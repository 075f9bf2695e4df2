"""Stage 2: train the U-Net on latents of the frozen autoencoder, conditioned by a frozen conditioner.

    image ─ autoencoder.encode (frozen) ─ ×scale_factor ─ z0 ─ add noise at t ─ z_t ─┐
    caption ─ ("" with probability ucg_rate) ─ conditioner (frozen) ─ context, mask ─ U-Net(z_t, t, ·) ─ loss

Only the U-Net trains. An EMA copy of it is kept; checkpoints carry the U-Net, its EMA, the autoencoder and
the trainable conditioner parts, never the frozen text encoder (it is rebuilt from its config).
"""

from __future__ import annotations

import logging
import math
import os
import random
from contextlib import nullcontext

import hydra
import lightning as L
import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from ldm.diffusion.objectives import diffusion_loss, normalize_prediction_type, sample_offset_noise
from ldm.diffusion.schedule import NoiseSchedule
from ldm.modules.autoencoder import AutoencoderKL, saved_config
from ldm.modules.lora import LoRASettings, add_lora
from ldm.modules.unet import UNetModel
from ldm.training.autoencoder_module import plain
from ldm.training.checkpoint import load_checkpoint
from ldm.training.ema import EMA
from ldm.training.lr_schedule import build_lr_scheduler
from ldm.training.rng import rng_state, sample_generators, set_rng_state

log = logging.getLogger(__name__)

NOISE_SEEDINGS = ("global", "per_sample")
AUTOENCODER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_conditioner(config: dict, seed: int = 0) -> nn.Module:
    """Instantiate a conditioner from its config. Random-weight stand-ins are drawn from a fixed seed, so the
    same config rebuilds the same frozen encoder when a checkpoint (which does not store it) is loaded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return hydra.utils.instantiate(config, _convert_="all")


def trainable_config(conditioner: dict) -> dict:
    """The config of the trainable variant of a frozen open_clip text encoder (for train_conditioner)."""
    from ldm.conditioning.trainable_text import TARGET

    frozen_target = "ldm.conditioning.text.FrozenOpenCLIPTextEncoder"
    if conditioner.get("_target_") not in (frozen_target, TARGET):
        raise ValueError(f"train_conditioner / lora.text_encoder need an open_clip text encoder "
                         f"({frozen_target}), not {conditioner.get('_target_')}")
    return {**conditioner, "_target_": TARGET}


def load_autoencoder(ckpt_path: str) -> tuple[AutoencoderKL, dict, float | None]:
    """The stage-1 autoencoder from a checkpoint: (model, its config, the measured latent std or None)."""
    ckpt = load_checkpoint(ckpt_path, "autoencoder checkpoint (autoencoder.ckpt_path)")
    hparams = ckpt.get("hyper_parameters", {})
    if "autoencoder" not in hparams:
        raise ValueError(f"{ckpt_path} is not a stage-1 checkpoint of this framework (no 'autoencoder' hyperparameters)")
    config = saved_config(hparams["autoencoder"])  # checkpoints from before the norm setting: GroupNorm(32)
    model = AutoencoderKL(**config)
    prefix = "autoencoder."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    latent_std = ckpt["state_dict"].get("latent_std")
    return model, config, None if latent_std is None else float(latent_std)


class DiffusionModule(L.LightningModule):
    def __init__(
        self,
        unet: dict,
        conditioner: dict,
        schedule: dict,
        autoencoder_ckpt: str | None = None,
        autoencoder: dict | None = None,
        scale_factor: float | None = None,
        prediction_type: str = "eps",
        min_snr_gamma: float | None = None,
        offset_noise: float = 0.0,
        ucg_rate: float = 0.1,
        sample_posterior: bool = True,
        ema: dict | None = None,
        optimizer: dict | None = None,
        lr_schedule: dict | None = None,
        conditioner_seed: int = 0,
        nonfinite_loss: str = "raise",
        sampling: dict | None = None,
        noise_seeding: str = "global",
        autoencoder_precision: str = "fp32",
        compile: bool | dict = False,
        init=None,
        lora: dict | bool | None = None,
        train_conditioner: bool = False,
    ):
        """
        unet: UNetModel arguments. conditioner: a Hydra config with ``_target_`` (text or class labels).
        schedule: NoiseSchedule arguments.
        autoencoder_ckpt: the stage-1 checkpoint to load and freeze. ``autoencoder`` (its config) is filled in
            from it and saved, so a stage-2 checkpoint alone is enough to sample.
        scale_factor: multiplies latents; None takes 1/std measured in stage 1 (else the autoencoder's own).
        ucg_rate: probability of replacing a caption by "" so classifier-free guidance works at sampling time.
        ema: EMA arguments (decay, start_step, update_every, warmup), or None for no EMA.
        optimizer: a Hydra config of a partial optimizer (``_partial_: true``) that takes the parameters.
        lr_schedule: build_lr_scheduler arguments (kind, warmup_steps, min_lr_ratio).
        nonfinite_loss: "raise" stops the run on a NaN/inf loss; "skip" drops that batch's update (on every rank
            together when any rank's loss is non-finite, so data-parallel ranks stay in step).
        sampling: defaults for sample images (sampler, steps, cfg_scale, ...), saved for the pipeline.
        noise_seeding: "global" draws t, noise, posterior noise and caption dropout from the global RNG;
            "per_sample" draws them for each sample from a generator seeded by (seed, sample key, step), so a
            run does not depend on how its batches are split over ranks (1 GPU × batch 64 = 8 GPUs × batch 8).
        autoencoder_precision: "fp32" | "bf16" | "fp16": the dtype the frozen autoencoder encodes in, with
            autocast off (fp16 VAEs are known to overflow to NaN; bf16 halves their memory and time safely).
        compile: torch.compile the U-Net's forward (in place: state-dict keys keep their names); a dict gives
            torch.compile's arguments (e.g. {"mode": "max-autotune"}). Not saved: it belongs to a run, not to
            the weights, so sampling from the checkpoint does not compile.
        init: a ``PretrainedInit`` (ldm.training.init_from) to start from: it decides the U-Net architecture, the
            autoencoder (unless ``autoencoder_ckpt`` is given), the text encoder, the prediction type and the
            schedule where it holds them, and gives their weights; the EMA starts from the loaded U-Net.
        lora: LoRASettings fields (or true for the defaults): adapters on the U-Net's attention projections (and
            on the text encoder with ``text_encoder: true``); then only the adapters train.
        train_conditioner: train the text encoder with the U-Net (DreamBooth's train_text_encoder); with LoRA
            on, it means adapters in the text encoder rather than its full weights.
        """
        super().__init__()
        if nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"nonfinite_loss must be 'raise' or 'skip', got {nonfinite_loss!r}")
        if noise_seeding not in NOISE_SEEDINGS:
            raise ValueError(f"noise_seeding must be one of {NOISE_SEEDINGS}, got {noise_seeding!r}")
        if autoencoder_precision not in AUTOENCODER_DTYPES:
            raise ValueError(f"autoencoder_precision must be one of {tuple(AUTOENCODER_DTYPES)}, "
                             f"got {autoencoder_precision!r}")
        unet, conditioner, schedule, ema, optimizer, lr_schedule, sampling = map(
            plain, (unet, conditioner, schedule, ema, optimizer, lr_schedule, sampling)
        )
        lora = LoRASettings.parse(plain(lora))
        if init is not None:
            unet = init.unet_kwargs(unet)
            if init.conditioner_config is not None:
                conditioner = init.conditioner_config
                conditioner_seed = conditioner_seed if init.conditioner_seed is None else init.conditioner_seed
            schedule = {**schedule, **(init.schedule_config or {})}
            prediction_type = init.prediction_type or prediction_type
            if autoencoder_ckpt is None:
                if init.autoencoder_config is None:
                    raise ValueError(f"init_from {init.source} holds no autoencoder: set autoencoder.ckpt_path=PATH")
                autoencoder = init.autoencoder_config  # its scale_factor comes with it
        latent_std = None
        if autoencoder_ckpt is not None:
            vae, autoencoder, latent_std = load_autoencoder(autoencoder_ckpt)
            log.info("autoencoder loaded from %s and frozen", autoencoder_ckpt)
        elif autoencoder is not None:
            # A saved config (the weights come from the stage-2 checkpoint being loaded, or from init_from).
            autoencoder = saved_config(plain(autoencoder))
            vae = AutoencoderKL(**autoencoder)
        else:
            raise ValueError("stage 2 needs the stage-1 autoencoder: set autoencoder.ckpt_path=PATH")
        autoencoder = plain(autoencoder)
        if scale_factor is None:
            scale_factor = 1.0 / latent_std if latent_std else vae.scale_factor
        self.save_hyperparameters(ignore=["autoencoder_ckpt", "init"])
        self.hparams["scale_factor"] = float(scale_factor)
        self.hparams["autoencoder"] = autoencoder
        self.hparams.update(unet=unet, conditioner=conditioner, conditioner_seed=conditioner_seed, schedule=schedule,
                            prediction_type=prediction_type, lora=lora.as_dict() if lora.enabled else None)
        log.info("latent scale_factor = %.5f", scale_factor)

        self.prediction_type = normalize_prediction_type(prediction_type)
        self.unet = UNetModel(**unet)
        self.autoencoder = vae.requires_grad_(False).eval().to(AUTOENCODER_DTYPES[autoencoder_precision])
        self.autoencoder.scale_factor = float(scale_factor)
        train_text = train_conditioner or (lora.enabled and lora.text_encoder)
        self.conditioner = build_conditioner(trainable_config(conditioner) if train_text else conditioner,
                                             conditioner_seed)
        if getattr(self.conditioner, "frozen", True):
            self.conditioner.requires_grad_(False).eval()
        if init is not None:
            self._load_init(init, load_autoencoder=autoencoder_ckpt is None)
        if lora.enabled:
            # After the pretrained weights, before the EMA copy: adapters start at zero (the loaded model),
            # and from here on only they train.
            add_lora(self.unet, lora.rank, lora.alpha, lora.dropout, lora.target_modules, "U-Net")
            if train_text:
                add_lora(self.conditioner.text, lora.rank, lora.alpha, lora.dropout,
                         lora.text_encoder_target_modules, "text encoder")
            log.info("LoRA (rank %d, alpha %g): %d trainable parameters", lora.rank, lora.alpha,
                     sum(p.numel() for p in self.trainable_parameters()))
        self.schedule = NoiseSchedule(**schedule)
        self.ema = EMA(self.unet, **ema) if ema else None
        self._ema_step = -1
        self.skipped_nonfinite = 0
        self._uncond_context: tuple[torch.Tensor, torch.Tensor] | None = None
        self._skip_update = False
        self.register_load_state_dict_pre_hook(DiffusionModule._fill_frozen_conditioner)
        self.hparams.pop("compile", None)
        if compile:
            # In place, after the EMA copy: the module keeps its parameter names (no "_orig_mod." prefix), so
            # checkpoints, resume and the EMA are the same with and without compilation.
            options = plain(compile)
            self.unet.compile(**(options if isinstance(options, dict) else {}))

    def _load_init(self, init, load_autoencoder: bool) -> None:
        self.unet.load_state_dict(init.unet_state, strict=True)
        if load_autoencoder:
            self.autoencoder.load_state_dict(init.autoencoder_state, strict=True)
        if init.conditioner_state is not None:
            self.conditioner.load_state_dict(init.conditioner_state, strict=True)
        width = getattr(self.conditioner, "output_dim", None)
        if width is not None and width != self.unet.context_dim:
            raise ValueError(f"init_from {init.source}: the U-Net's context_dim is {self.unet.context_dim} but the "
                             f"conditioner gives {width}-wide contexts (model.conditioner does not fit these weights)")
        log.info("initialised from %s", init.source)

    # -- frozen parts -----------------------------------------------------------------------------------------

    @property
    def conditioner_frozen(self) -> bool:
        return bool(getattr(self.conditioner, "frozen", True))

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen parts stay in eval mode whatever the trainer asks (no dropout, fixed normalisation).
        self.autoencoder.eval()
        if self.conditioner_frozen:
            self.conditioner.eval()
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

    def _fsdp_root(self):
        """The FSDP-wrapped model under trainer=fsdp, else None."""
        model = self.trainer.strategy.model if self._trainer is not None else None
        return model if isinstance(model, FullyShardedDataParallel) else None

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

    @staticmethod
    def _randn(like: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
        if generators is None:
            return torch.randn(like.shape, device=like.device, dtype=like.dtype)
        return torch.stack([torch.randn(like.shape[1:], generator=g) for g in generators]).to(like)

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor | None,
                       generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """z0 = (mean + std·ε)·scale_factor from the posterior q(z|x); its mean without sample_posterior."""
        z = mean.float()
        if self.hparams.sample_posterior and std is not None:
            z = z + std.float() * self._randn(z, generators)
        return z * self.autoencoder.scale_factor

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        # The autoencoder runs in its own precision (autoencoder_precision), never under the trainer's autocast.
        with torch.autocast(self.device.type, enabled=False):
            posterior = self.autoencoder.encode(images.to(next(self.autoencoder.parameters()).dtype))
        return self.sample_latents(posterior.mean, posterior.std, generators)

    def batch_latents(self, batch: dict, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """z0 (B, C, h, w): encoded from batch["image"], or from cached posteriors batch["latent"] (the mean,
        unscaled) and batch["latent_std"] (see ldm.data.cache_latents)."""
        if "latent" in batch:
            return self.sample_latents(batch["latent"].to(self.device), batch.get("latent_std"), generators)
        return self.encode_images(batch["image"], generators)

    def drop_flags(self, n: int, generators: list[torch.Generator] | None = None) -> list[bool]:
        """Which of n captions become "" (probability ucg_rate, training only)."""
        rate = self.hparams.ucg_rate
        if not self.training or rate <= 0:
            return [False] * n
        if generators is None:
            return [random.random() < rate for _ in range(n)]
        return [bool(torch.rand((), generator=g) < rate) for g in generators]

    def drop_captions(self, captions: list) -> list:
        return ["" if drop else c for c, drop in zip(captions, self.drop_flags(len(captions)))]

    def condition(self, captions: list) -> tuple[torch.Tensor, torch.Tensor]:
        if self.conditioner_frozen:
            with torch.no_grad():
                context, mask = self.conditioner(captions)
        else:
            context, mask = self.conditioner(captions)
        return context.to(self.device), mask.to(self.device)

    def empty_context(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The context of "" (1, length, d), padded with masked zeros (masked tokens get no attention)."""
        if self._uncond_context is None:
            self._uncond_context = self.condition([""])
        context, mask = self._uncond_context
        pad = length - context.shape[1]
        if pad < 0:
            raise ValueError(f"cached contexts hold {length} tokens, fewer than the {context.shape[1]} of \"\"")
        return (torch.nn.functional.pad(context, (0, 0, 0, pad)).to(self.device),
                torch.nn.functional.pad(mask, (0, pad), value=False).to(self.device))

    def batch_context(self, batch: dict, generators: list[torch.Generator] | None = None):
        """(context (B, L, d), mask (B, L)) of the captions after dropout, or of cached text embeddings
        (batch["context"], batch["mask"]) with the dropped rows replaced by the context of ""."""
        n = len(batch["caption"]) if "caption" in batch else batch["context"].shape[0]
        drop = self.drop_flags(n, generators)
        if "context" not in batch:
            return self.condition(["" if d else c for c, d in zip(batch["caption"], drop)])
        context, mask = batch["context"].to(self.device), batch["mask"].to(self.device)
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
                raise FloatingPointError(message + "; set model.nonfinite_loss=skip to drop such batches instead")
            self.skipped_nonfinite += 1
            log.warning("%s: update skipped on every rank (%d so far)", message, self.skipped_nonfinite)
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), batch_size=1)
            # Backward still runs on every rank (Lightning refuses a None loss in distributed training, and DDP
            # and FSDP expect every rank's gradients); optimizer_step then drops the gradients unused.
            self._skip_update = True
            return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
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

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        fsdp = self._fsdp_root()
        if fsdp is None or not gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"trainer=fsdp clips gradients by norm only, got {gradient_clip_algorithm!r}")
        # The norm over all shards: torch.nn.utils.clip_grad_norm_ would see this rank's shard only.
        fsdp.clip_grad_norm_(gradient_clip_val)

    def on_before_optimizer_step(self, optimizer) -> None:
        squares = [p.grad.detach().float().pow(2).sum() for p in self.trainable_parameters() if p.grad is not None]
        if squares:
            total = torch.stack(squares).sum()
            if self._fsdp_root() is not None:  # each rank holds a shard of the gradients
                total = self._sum_over_ranks(total)
            self.log("train/grad_norm", total.sqrt(), batch_size=1)

    def on_train_start(self) -> None:
        # EMA updates follow optimizer steps: the first is due when global_step first moves on from here.
        self._ema_step = self.global_step
        # A resumed optimizer brings back the learning rate the old schedule had set. This run's schedule (whose
        # length follows trainer.max_steps, which a resumed run may change) decides it for the restored step.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, LambdaLR):
                for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                               scheduler.lr_lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)

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
        # global_step counts optimizer steps: with gradient accumulation it does not move every batch.
        if self.ema is not None and self.global_step != self._ema_step:
            self._ema_step = self.global_step
            fsdp = self._fsdp_root()
            # Under FSDP the U-Net holds shards between steps: gather the full weights (all ranks) to average.
            with FullyShardedDataParallel.summon_full_params(fsdp, writeback=False) if fsdp else nullcontext():
                self.ema.update(self.unet, self.global_step)

    # -- inference --------------------------------------------------------------------------------------------

    def sampling_unet(self, use_ema: bool = True) -> UNetModel:
        return self.ema.model if (use_ema and self.ema is not None) else self.unet
