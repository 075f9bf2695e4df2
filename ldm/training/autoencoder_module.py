"""Stage 1: train the KL autoencoder, with the patch discriminator when it is enabled."""

from __future__ import annotations

import math

import lightning as L
import torch

from ldm.config_values import plain
from ldm.evaluation.emoji import psnr
from ldm.images import grid_image
from ldm.modules.autoencoder import AutoencoderKL, saved_config
from ldm.modules.autoencoder_loss import AutoencoderLoss
from ldm.training.gradients import clip_and_measure
from ldm.training.images import log_image
from ldm.training.lr_schedule import build_lr_scheduler


class AutoencoderModule(L.LightningModule):
    def __init__(
        self,
        autoencoder: dict,
        loss: dict,
        lr: float = 4.5e-6,
        disc_lr: float | None = None,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        fused_optimizer: bool = True,
        log_images_every_n_steps: int = 500,
        num_log_images: int = 8,
    ):
        """
        autoencoder: AutoencoderKL arguments (ch, ch_mult, num_res_blocks, z_channels, ...).
        loss: AutoencoderLoss arguments (rec_loss, kl_weight, disc_enabled, disc_start, ...).
        disc_lr: the discriminator's learning rate (default: lr).
        fused_optimizer: torch's fused AdamW kernel (the same update to float rounding, fewer memory passes).

        The autoencoder and the discriminator are two parameter groups of one optimizer and take a step on
        every batch. Their gradients stay apart: the discriminator is frozen while the generator's GAN term
        is computed, and its own loss sees detached reconstructions.
        """
        super().__init__()
        # save_hyperparameters reads the arguments' current values: make them plain first.
        autoencoder, loss, betas = plain(autoencoder), plain(loss), tuple(plain(betas))
        self.autoencoder = AutoencoderKL(**autoencoder)
        # The normalisation is saved explicitly: a saved config without it means the old GroupNorm(32).
        autoencoder = {**autoencoder, **self.autoencoder.norm_config}
        self.save_hyperparameters()
        self.loss = AutoencoderLoss(**loss)
        # Running std of the latents: stage 2 sets its scale_factor to 1/std so its inputs have unit variance.
        self.register_buffer("latent_std", torch.ones(()))
        self.register_buffer("latent_std_initialised", torch.zeros((), dtype=torch.bool))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # GroupNorm's weights have the same shapes whatever its groups: a checkpoint of another normalisation
        # would load without complaint and compute something else.
        saved = checkpoint.get("hyper_parameters", {}).get("autoencoder")
        if saved is None:
            return
        theirs, ours = saved_config(saved), self.autoencoder.norm_config
        differ = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        if differ:
            raise ValueError(
                "the checkpoint's autoencoder was trained with another normalisation: "
                + ", ".join(f"model.autoencoder.{k}={t} (this config: {o})" for k, (t, o) in differ.items())
                + "; set those values to resume it"
            )

    # -- steps ------------------------------------------------------------------------------------------------

    def _update_latent_std(self, mean: torch.Tensor) -> None:
        std = mean.detach().float().std()
        if not bool(self.latent_std_initialised):
            self.latent_std.copy_(std)
            self.latent_std_initialised.fill_(True)
        else:
            # In float32: under FSDP's bf16 mixed precision the buffer itself is bf16.
            self.latent_std.copy_(torch.lerp(self.latent_std.float(), std, 0.01))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        x_rec, posterior = self.autoencoder(x)
        self._update_latent_std(posterior.mean)
        last_layer = self.autoencoder.decoder.conv_out.weight
        if self.loss.disc_active(self.global_step):
            self.loss.discriminator.requires_grad_(False)
        ae_loss, logs = self.loss.generator_loss(x, x_rec, posterior, self.global_step, last_layer)
        total = ae_loss
        if self.loss.disc_active(self.global_step):
            self.loss.discriminator.requires_grad_(True)
            d_loss, d_logs = self.loss.discriminator_loss(x, x_rec)
            total = total + d_loss
            logs.update(d_logs)
        elif self.loss.discriminator is not None:
            # Before disc_start the discriminator's loss enters with weight 0, as in CompVis's loss (disc_factor 0):
            # under DDP every parameter must take part in every backward. The discriminator's weights stay as
            # they are; its Adam steps count on with zero gradients, as CompVis's discriminator optimizer does.
            total = total + 0.0 * self.loss.discriminator_loss(x, x_rec)[0]
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"non-finite autoencoder loss at step {self.global_step}: {({k: float(v) for k, v in logs.items()})}"
            )
        rec = logs.pop("rec_loss")
        self.log("train/rec_loss", rec, prog_bar=True, batch_size=x.shape[0])
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=x.shape[0])
        self.log("train/latent_std", self.latent_std, batch_size=x.shape[0])
        if self.hparams.log_images_every_n_steps and self.global_step % self.hparams.log_images_every_n_steps == 0:
            self._log_reconstructions(x, x_rec, "train/reconstructions")
        return total

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        x_rec, posterior = self.autoencoder(x, sample_posterior=False)
        _, logs = self.loss.generator_loss(x, x_rec, posterior, step=-1)  # step -1: no GAN term in validation
        b = x.shape[0]
        self.log("val/rec_loss", logs["rec_loss"], batch_size=b, sync_dist=True)
        self.log("val/kl_loss", logs["kl_loss"], batch_size=b, sync_dist=True)
        self.log("val/psnr", psnr(x, x_rec).mean(), batch_size=b, prog_bar=True, sync_dist=True)
        if batch_idx == 0:
            self._log_reconstructions(x, x_rec, "val/reconstructions")

    def _log_reconstructions(self, x: torch.Tensor, x_rec: torch.Tensor, key: str) -> None:
        if self.trainer is None or not self.trainer.is_global_zero:
            return
        n = min(self.hparams.num_log_images, x.shape[0])
        # Top row originals, bottom row reconstructions.
        pair = torch.cat([x[:n], x_rec[:n]]).detach()
        log_image(self.trainer, key, grid_image(pair, nrow=n, upscale=max(1, 128 // x.shape[-1])),
                  caption="top: input, bottom: reconstruction")

    # -- optimisation -----------------------------------------------------------------------------------------

    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": list(self.autoencoder.parameters()), "lr": hp.lr}]
        if self.loss.discriminator is not None:
            groups.append({"params": list(self.loss.discriminator.parameters()), "lr": hp.disc_lr or hp.lr})
        optimizer = torch.optim.AdamW(groups, betas=tuple(hp.betas), weight_decay=hp.weight_decay,
                                      fused=hp.get("fused_optimizer", True) or None)
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else None
        total = None if total is None or math.isinf(total) else int(total)
        scheduler = build_lr_scheduler(optimizer, hp.lr_schedule, hp.warmup_steps, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's clipping refuses the fused optimizer under mixed precision; see ldm.training.gradients.
        norm = clip_and_measure(self.trainer, optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.log("train/grad_norm", norm, batch_size=1)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=1)

