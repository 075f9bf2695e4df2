"""Stage 2: train the U-Net on latents of the frozen autoencoder, conditioned by a frozen conditioner.

    image ─ autoencoder.encode (frozen) ─ ×scale_factor ─ z0 ─ add noise at t ─ z_t ─┐
    caption ─ ("" with probability ucg_rate) ─ conditioner (frozen) ─ context, mask ─ U-Net(z_t, t, ·) ─ loss

Only the U-Net trains. An EMA copy of it is kept; checkpoints carry the U-Net, its EMA, the autoencoder and
the trainable conditioner parts, never the frozen text encoder (it is rebuilt from its config).
"""

from __future__ import annotations

import logging
import math
import random

import hydra
import lightning as L
import torch
from torch import nn

from ldm.diffusion.objectives import diffusion_loss, normalize_prediction_type
from ldm.diffusion.schedule import NoiseSchedule
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.unet import UNetModel
from ldm.training.autoencoder_module import plain
from ldm.training.checkpoint import load_checkpoint
from ldm.training.ema import EMA
from ldm.training.lr_schedule import build_lr_scheduler

log = logging.getLogger(__name__)


def build_conditioner(config: dict, seed: int = 0) -> nn.Module:
    """Instantiate a conditioner from its config. Random-weight stand-ins are drawn from a fixed seed, so the
    same config rebuilds the same frozen encoder when a checkpoint (which does not store it) is loaded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return hydra.utils.instantiate(config, _convert_="all")


def load_autoencoder(ckpt_path: str) -> tuple[AutoencoderKL, dict, float | None]:
    """The stage-1 autoencoder from a checkpoint: (model, its config, the measured latent std or None)."""
    ckpt = load_checkpoint(ckpt_path, "autoencoder checkpoint (autoencoder.ckpt_path)")
    hparams = ckpt.get("hyper_parameters", {})
    if "autoencoder" not in hparams:
        raise ValueError(f"{ckpt_path} is not a stage-1 checkpoint of this framework (no 'autoencoder' hyperparameters)")
    config = dict(hparams["autoencoder"])
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
        nonfinite_loss: "raise" stops the run on a NaN/inf loss; "skip" drops that batch's update.
        sampling: defaults for sample images (sampler, steps, cfg_scale, ...), saved for the pipeline.
        """
        super().__init__()
        if nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"nonfinite_loss must be 'raise' or 'skip', got {nonfinite_loss!r}")
        unet, conditioner, schedule, ema, optimizer, lr_schedule, sampling = map(
            plain, (unet, conditioner, schedule, ema, optimizer, lr_schedule, sampling)
        )
        latent_std = None
        if autoencoder_ckpt is not None:
            vae, autoencoder, latent_std = load_autoencoder(autoencoder_ckpt)
            log.info("autoencoder loaded from %s and frozen", autoencoder_ckpt)
        elif autoencoder is not None:
            vae = AutoencoderKL(**plain(autoencoder))  # weights come from the stage-2 checkpoint being loaded
        else:
            raise ValueError("stage 2 needs the stage-1 autoencoder: set autoencoder.ckpt_path=PATH")
        autoencoder = plain(autoencoder)
        if scale_factor is None:
            scale_factor = 1.0 / latent_std if latent_std else vae.scale_factor
        self.save_hyperparameters(ignore=["autoencoder_ckpt"])
        self.hparams["scale_factor"] = float(scale_factor)
        self.hparams["autoencoder"] = autoencoder
        log.info("latent scale_factor = %.5f", scale_factor)

        self.prediction_type = normalize_prediction_type(prediction_type)
        self.unet = UNetModel(**unet)
        self.autoencoder = vae.requires_grad_(False).eval()
        self.autoencoder.scale_factor = float(scale_factor)
        self.conditioner = build_conditioner(conditioner, conditioner_seed)
        if getattr(self.conditioner, "frozen", True):
            self.conditioner.requires_grad_(False).eval()
        self.schedule = NoiseSchedule(**schedule)
        self.ema = EMA(self.unet, **ema) if ema else None
        self._ema_step = -1
        self.skipped_nonfinite = 0

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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.conditioner_frozen:
            # The frozen encoder is rebuilt from its config (or its pretrained file) on load: not trainable state.
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith("conditioner.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.conditioner_frozen:
            state = checkpoint["state_dict"]
            for k, v in self.conditioner.state_dict(prefix="conditioner.").items():
                state.setdefault(k, v)

    # -- the step ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.autoencoder.encode(images.to(next(self.autoencoder.parameters()).dtype))
        z = posterior.sample() if self.hparams.sample_posterior else posterior.mode()
        return z.float() * self.autoencoder.scale_factor

    def drop_captions(self, captions: list) -> list:
        rate = self.hparams.ucg_rate
        if not self.training or rate <= 0:
            return list(captions)
        return ["" if random.random() < rate else c for c in captions]

    def condition(self, captions: list) -> tuple[torch.Tensor, torch.Tensor]:
        if self.conditioner_frozen:
            with torch.no_grad():
                context, mask = self.conditioner(captions)
        else:
            context, mask = self.conditioner(captions)
        return context.to(self.device), mask.to(self.device)

    def training_step(self, batch: dict, batch_idx: int):
        z0 = self.encode_images(batch["image"])  # (B, C, h, w)
        context, mask = self.condition(self.drop_captions(batch["caption"]))
        loss, stats = diffusion_loss(
            lambda x_t, t: self.unet(x_t, t, context, mask),
            z0,
            self.schedule,
            prediction_type=self.prediction_type,
            min_snr_gamma=self.hparams.min_snr_gamma,
            offset_noise=self.hparams.offset_noise,
        )
        if not torch.isfinite(loss):
            message = f"non-finite loss {loss.item()} at step {self.global_step} (batch keys: {batch.get('key', [])[:4]})"
            if self.hparams.nonfinite_loss == "raise":
                raise FloatingPointError(message + "; set model.nonfinite_loss=skip to drop such batches instead")
            self.skipped_nonfinite += 1
            log.warning("%s: update skipped (%d so far)", message, self.skipped_nonfinite)
            return None  # Lightning skips backward and the optimizer step
        b = z0.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/mse", stats["mse"].mean(), batch_size=b)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        z0 = self.encode_images(batch["image"])
        context, mask = self.condition(batch["caption"])
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
        params = list(self.unet.parameters())
        if not self.conditioner_frozen:
            params += list(self.conditioner.parameters())
        return params

    def configure_optimizers(self):
        config = self.hparams.optimizer or {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4}
        optimizer = hydra.utils.instantiate(config)(self.trainable_parameters())
        config = dict(self.hparams.lr_schedule or {})
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else None
        total = None if total is None or math.isinf(total) else int(total)
        scheduler = build_lr_scheduler(optimizer, total_steps=total, **config)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = [p.grad.detach().float().norm() for p in self.trainable_parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm(), batch_size=1)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=1, prog_bar=True)
        # global_step counts optimizer steps: with gradient accumulation it does not move every batch.
        if self.ema is not None and self.global_step != self._ema_step:
            self._ema_step = self.global_step
            self.ema.update(self.unet, self.global_step)

    # -- inference --------------------------------------------------------------------------------------------

    def sampling_unet(self, use_ema: bool = True) -> UNetModel:
        return self.ema.model if (use_ema and self.ema is not None) else self.unet
