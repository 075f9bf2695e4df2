"""Stage-1 objective: reconstruction + KL, optionally LPIPS and a hinge-loss patch discriminator.

Sums follow the latent-diffusion convention (per-sample sums over pixels and latent elements, averaged over
the batch) so that its published weights, e.g. kl_weight = 1e-6, mean the same here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.autoencoder import DiagonalGaussian
from ldm.modules.discriminator import NLayerDiscriminator
from ldm.modules.lpips import LPIPS


# BT.601 luma weights: the opponent colour channels below are the differences of R and B from the luma Y.
_LUMA = (0.299, 0.587, 0.114)


def chroma_channels(x: torch.Tensor) -> torch.Tensor:
    """The two colour-difference channels of RGB images (B, 3, H, W): (B, 2, H, W), B − Y and R − Y (the Cb and
    Cr of YCbCr without their scale), zero for every grey."""
    r, g, b = x.unbind(1)
    y = _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b
    return torch.stack([b - y, r - y], dim=1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class AutoencoderLoss(nn.Module):
    def __init__(
        self,
        rec_loss: str = "l1",
        kl_weight: float = 1e-6,
        perceptual_weight: float = 0.0,
        lpips_vgg_path: str | None = None,
        lpips_lin_path: str | None = None,
        disc_enabled: bool = False,
        disc_start: int = 50001,
        disc_weight: float = 0.5,
        disc_layers: int = 3,
        disc_channels: int = 64,
        max_adaptive_weight: float = 1e4,
        chroma_weight: float = 0.0,
    ):
        """
        chroma_weight: weight of a colour term, the rec_loss of the colour-difference channels (B − Y, R − Y)
            added to that of RGB. Colour varies far less than brightness across images, so plain RGB losses teach
            it last; this term gives colour errors their own weight (0: none, as in latent-diffusion).
        """
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        if chroma_weight < 0:
            raise ValueError(f"chroma_weight must be >= 0, got {chroma_weight}")
        self.rec_loss = rec_loss
        self.chroma_weight = chroma_weight
        self.kl_weight = kl_weight
        self.perceptual_weight = perceptual_weight
        self.lpips = None
        if perceptual_weight > 0:
            if not (lpips_vgg_path and lpips_lin_path):
                raise ValueError(
                    "perceptual_weight > 0 needs local LPIPS weights: set lpips_vgg_path and lpips_lin_path "
                    "(they cannot be downloaded at run time), or set perceptual_weight=0"
                )

            self.lpips = LPIPS(lpips_vgg_path, lpips_lin_path)
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.max_adaptive_weight = max_adaptive_weight
        self.discriminator = NLayerDiscriminator(3, disc_channels, disc_layers) if disc_enabled else None

    def _distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).abs() if self.rec_loss == "l1" else (x - y).pow(2)

    def disc_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.disc_start

    def _adaptive_weight(self, rec: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        # Balance the GAN gradient against the reconstruction gradient at the decoder's last layer
        # (Esser et al. 2021, eq. 7), so neither term swamps the other whatever their raw scales.
        rec_grad = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
        return weight.clamp(0.0, self.max_adaptive_weight).detach() * self.disc_weight

    def generator_loss(
        self,
        x: torch.Tensor,
        x_rec: torch.Tensor,
        posterior: DiagonalGaussian,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss. x, x_rec: (B, 3, H, W) in [-1, 1]."""
        b = x.shape[0]
        diff = self._distance(x, x_rec)
        per_pixel = diff
        if self.lpips is not None:
            per_pixel = per_pixel + self.perceptual_weight * self.lpips(x, x_rec)[:, None, None, None]
        rec = per_pixel.sum() / b
        logs = {}
        if self.chroma_weight > 0:
            chroma = self._distance(chroma_channels(x), chroma_channels(x_rec)).sum() / b
            rec = rec + self.chroma_weight * chroma
            logs["chroma_loss"] = chroma.detach()
        kl = posterior.kl().sum() / b
        loss = rec + self.kl_weight * kl
        logs.update(rec_loss=diff.mean().detach(), kl_loss=kl.detach())
        if self.disc_active(step):
            g_loss = -self.discriminator(x_rec).mean()
            if self.training and last_layer is not None and torch.is_grad_enabled():
                weight = self._adaptive_weight(rec, g_loss, last_layer)
            else:
                weight = torch.tensor(self.disc_weight, device=x.device)
            loss = loss + weight * g_loss
            logs.update(g_loss=g_loss.detach(), disc_adaptive_weight=weight)
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_rec.detach())
        d_loss = hinge_d_loss(logits_real, logits_fake)
        return d_loss, {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.mean().detach(),
            "logits_fake": logits_fake.mean().detach(),
        }
