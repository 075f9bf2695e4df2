"""What the network predicts (eps, v or x0), how predictions convert, and the weighted training loss.

With x_t = √ᾱ·x0 + √(1−ᾱ)·eps and v = √ᾱ·eps − √(1−ᾱ)·x0 (Salimans & Ho 2022), any one of eps, v, x0
together with x_t determines the other two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ldm.diffusion.schedule import NoiseSchedule, append_dims

PredictionType = Literal["eps", "v", "x0"]
PREDICTION_TYPES: tuple[str, ...] = ("eps", "v", "x0")
# diffusers' names for the same three targets, so its configs can be read directly.
_PREDICTION_TYPE_ALIASES: dict[str, str] = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}

# ᾱ_t as a Python float (one timestep) or a tensor broadcastable against x_t (per-sample, (B, 1, ..., 1)).
AlphaCumprod = float | Tensor
ModelFn = Callable[[Tensor, Tensor], Tensor]


def normalize_prediction_type(prediction_type: str) -> PredictionType:
    """Map "eps" | "v" | "x0" and diffusers' "epsilon" | "v_prediction" | "sample" to "eps" | "v" | "x0"."""
    name = _PREDICTION_TYPE_ALIASES.get(prediction_type, prediction_type)
    if name not in PREDICTION_TYPES:
        choices = PREDICTION_TYPES + tuple(_PREDICTION_TYPE_ALIASES)
        raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of {choices}")
    return name  # type: ignore[return-value]


def v_target(x0: Tensor, eps: Tensor, alpha_cumprod_t: AlphaCumprod) -> Tensor:
    """v = √ᾱ·eps − √(1−ᾱ)·x0."""
    return alpha_cumprod_t**0.5 * eps - (1 - alpha_cumprod_t) ** 0.5 * x0


def training_target(x0: Tensor, eps: Tensor, alpha_cumprod_t: AlphaCumprod, prediction_type: str) -> Tensor:
    """The regression target for the network: eps, v or x0."""
    kind = normalize_prediction_type(prediction_type)
    if kind == "eps":
        return eps
    if kind == "v":
        return v_target(x0, eps, alpha_cumprod_t)
    return x0


def pred_to_x0_eps(
    pred: Tensor, x_t: Tensor, alpha_cumprod_t: AlphaCumprod, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """Convert a network output of `prediction_type` at x_t into (x0, eps).

    eps-prediction divides by √ᾱ_t, so it is undefined where ᾱ_t = 0 (the last step of a zero-terminal-SNR
    schedule); v and x0 are defined everywhere except x0 at ᾱ_t = 1.
    """
    kind = normalize_prediction_type(prediction_type)
    sqrt_alpha = alpha_cumprod_t**0.5
    sqrt_one_minus_alpha = (1 - alpha_cumprod_t) ** 0.5
    if kind == "eps":
        eps = pred
        x0 = (x_t - sqrt_one_minus_alpha * eps) / sqrt_alpha
    elif kind == "v":
        x0 = sqrt_alpha * x_t - sqrt_one_minus_alpha * pred
        eps = sqrt_alpha * pred + sqrt_one_minus_alpha * x_t
    else:
        x0 = pred
        eps = (x_t - sqrt_alpha * x0) / sqrt_one_minus_alpha
    return x0, eps


def min_snr_weight(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023), expressed for the target the network regresses.

    The paper weights the x0-space error by min(SNR, γ); an eps error equals the x0 error times SNR and a
    v error equals it times (SNR + 1), hence the divisions.
    """
    kind = normalize_prediction_type(prediction_type)
    clipped = snr.clamp(max=gamma)
    if kind == "eps":
        # min(SNR, γ)/SNR written without 0/0: it tends to 1 as SNR → 0 (zero-terminal-SNR schedules).
        return torch.where(snr < gamma, torch.ones_like(snr), gamma / snr)
    if kind == "v":
        return clipped / (snr + 1)
    return clipped


def sample_noise(
    shape: tuple[int, ...],
    like: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Standard normal noise with `like`'s dtype and device; drawn on the generator's device if one is given."""
    draw_device = generator.device if generator is not None else like.device
    noise = torch.randn(shape, generator=generator, device=draw_device, dtype=like.dtype)
    return noise.to(like.device)


def sample_offset_noise(x0: Tensor, offset: float, generator: torch.Generator | None = None) -> Tensor:
    """eps = randn + offset·randn(B, C, 1, 1): a per-channel shift lets the model learn to change mean brightness."""
    eps = sample_noise(tuple(x0.shape), x0, generator)
    if offset != 0.0:
        per_channel = sample_noise(tuple(x0.shape[:2]) + (1,) * (x0.ndim - 2), x0, generator)  # (B, C, 1, 1)
        eps = eps + offset * per_channel
    return eps


def diffusion_loss(
    model_fn: ModelFn,
    x0: Tensor,
    schedule: NoiseSchedule,
    *,
    prediction_type: str = "eps",
    min_snr_gamma: float | None = None,
    offset_noise: float = 0.0,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Denoising loss: draw t and eps, form x_t, regress the target of `prediction_type` with an MSE.

    x0: (B, C, H, W) clean latents. `t` (B,) long and `noise` (B, C, H, W) are drawn when not given; a given
    `noise` is used as is (offset_noise only shapes noise drawn here). `model_fn(x_t, t)` returns the
    prediction. Returns the batch-mean loss (float32 scalar; with reduction="none" the per-sample losses (B,),
    for losses that weigh parts of a batch differently) and per-sample float32 statistics, detached:
    t, snr, weight, mse (unweighted) and loss (weighted).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    batch = x0.shape[0]
    if t is None:
        t = schedule.sample_timesteps(batch, generator=generator, device=x0.device)
    t = t.to(x0.device)
    if noise is None:
        noise = sample_offset_noise(x0, offset_noise, generator)
    x_t = schedule.add_noise(x0, noise, t)  # (B, C, H, W)
    pred = model_fn(x_t, t)

    alpha_cumprod = append_dims(schedule.alphas_cumprod_at(t), x0.ndim)  # (B, 1, 1, 1) float32
    # Reduce in float32 whatever the autocast dtype of the prediction.
    target = training_target(x0.float(), noise.float(), alpha_cumprod, prediction_type)
    mse = (pred.float() - target).pow(2).flatten(1).mean(dim=1)  # (B,)

    snr = schedule.snr(t)  # (B,)
    if min_snr_gamma is None:
        weight = torch.ones_like(mse)
    else:
        weight = min_snr_weight(snr, min_snr_gamma, prediction_type)
    per_sample = weight * mse  # (B,)
    stats = {"t": t, "snr": snr, "weight": weight, "mse": mse.detach(), "loss": per_sample.detach()}
    return (per_sample.mean() if reduction == "mean" else per_sample), stats
