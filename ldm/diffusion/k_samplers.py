"""Samplers that step in σ (noise-to-signal) or λ (log-SNR) space: DPM-Solver++(2M) and Euler ancestral.

They keep the signature of every sampler (`ldm.diffusion.sampler_common`): sampler(model_fn, x_T, schedule,
*, num_steps, ...). x_T is the VP sample z_T ~ N(0, I) as for DDIM, and `callback` sees (and may replace) the
VP sample z_t, so a callback written for DDIM (latent blending, Attend-and-Excite) works unchanged. Internally

    σ_t = √((1 − ᾱ_t)/ᾱ_t),   z_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε  ⇔  x_σ = z_t/√ᾱ_t = z_t·√(1 + σ²) = x0 + σ·ε

Timesteps follow diffusers' `set_timesteps` for DPMSolverMultistepScheduler and EulerAncestralDiscreteScheduler
(their default spacing is "linspace"), through the spacing rule of every sampler, `sampling_timesteps`. Euler
ancestral interpolates σ linearly at fractional timesteps, as diffusers does; the model then gets t as float32.
Every other sampler passes t as long.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.diffusion.objectives import ModelFn, pred_to_x0_eps
from ldm.diffusion.sampler_common import Callback, NoiseFn, run_callback, step_noise
from ldm.diffusion.schedule import NoiseSchedule, TimestepSpacing, sampling_timesteps

# A zero-terminal-SNR schedule has ᾱ_T = 0, i.e. σ_T = ∞. As diffusers does, floor ᾱ at the smallest
# positive float16 subnormal so that the first σ is large but finite.
MIN_ALPHA_CUMPROD = 2.0**-24


def _alphas_cumprod(schedule: NoiseSchedule) -> np.ndarray:
    # (T,) float64 on the host: per-step scalars without device syncs or float32 round-off.
    return np.maximum(schedule.alphas_cumprod_float64().numpy(), MIN_ALPHA_CUMPROD)


def dpm_solver_timesteps(
    num_steps: int, num_train_timesteps: int, spacing: TimestepSpacing = "linspace", steps_offset: int = 0
) -> list[int]:
    """Integer timesteps of diffusers' DPMSolverMultistepScheduler.set_timesteps: N + 1 points, the lowest
    dropped (the last step lands on σ = 0), e.g. 999, 979, …, 20 for linspace and N = 50."""
    return sampling_timesteps(num_steps, num_train_timesteps, spacing, steps_offset, drop_lowest=True).tolist()


def euler_timesteps(
    num_steps: int, num_train_timesteps: int, spacing: TimestepSpacing = "linspace", steps_offset: int = 0
) -> list[float]:
    """Timesteps of diffusers' EulerAncestralDiscreteScheduler.set_timesteps, in float32 as there: linspace
    is not rounded (999, 978.6, …, 0 for N = 50)."""
    return sampling_timesteps(num_steps, num_train_timesteps, spacing, steps_offset, integral=False).tolist()


def dpmpp_2m_timesteps(
    schedule: NoiseSchedule,
    *,
    num_steps: int = 25,
    timestep_spacing: TimestepSpacing = "linspace",
    steps_offset: int = 0,
    **_other_options: Any,
) -> Tensor:
    """The (N,) int64 timesteps sample_dpmpp_2m visits with these options (its defaults are the same)."""
    return sampling_timesteps(num_steps, schedule.num_timesteps, timestep_spacing, steps_offset, drop_lowest=True)


def euler_ancestral_timesteps(
    schedule: NoiseSchedule,
    *,
    num_steps: int = 50,
    timestep_spacing: TimestepSpacing = "linspace",
    steps_offset: int = 0,
    **_other_options: Any,
) -> Tensor:
    """The (N,) timesteps sample_euler_ancestral passes to its model with these options (its defaults are the
    same): int64 when they all fall on training timesteps, else float32 (fractional linspace timesteps)."""
    timesteps = sampling_timesteps(num_steps, schedule.num_timesteps, timestep_spacing, steps_offset, integral=False)
    # On training timesteps the model gets t as long, like every other sampler's model.
    return timesteps.long() if bool((timesteps == timesteps.round()).all()) else timesteps


def _timestep_batch(t: float, batch: int, device: torch.device, integral: bool) -> Tensor:
    if integral:
        return torch.full((batch,), int(t), dtype=torch.long, device=device)  # (B,)
    return torch.full((batch,), t, dtype=torch.float32, device=device)  # (B,)


def _log_snr(alpha_cumprod: float) -> float:
    """λ = log(α/σ) = ½·log(ᾱ/(1 − ᾱ)), ±∞ at the ends."""
    if alpha_cumprod <= 0.0:
        return -math.inf
    if alpha_cumprod >= 1.0:
        return math.inf
    return 0.5 * math.log(alpha_cumprod / (1.0 - alpha_cumprod))


@torch.no_grad()
def sample_dpmpp_2m(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    *,
    num_steps: int = 25,
    timestep_spacing: TimestepSpacing = "linspace",
    steps_offset: int = 0,
    prediction_type: str = "eps",
    generator: torch.Generator | None = None,
    noise_fn: NoiseFn | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): a multistep solver of the probability-flow ODE in the
    data-prediction form, midpoint variant, as diffusers' DPMSolverMultistepScheduler(solver_order=2,
    algorithm_type="dpmsolver++", solver_type="midpoint", final_sigmas_type="zero").

    With α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), λ = log(α/σ), h = λ_t − λ_s, D0 = x̂0(s):
        first order:  z_t = (σ_t/σ_s)·z_s − α_t·(e^{−h} − 1)·D0
        second order: z_t = (σ_t/σ_s)·z_s − α_t·(e^{−h} − 1)·(D0 + ½·D1),  D1 = (D0 − x̂0(s_prev))·h/h_prev
    The first step has no history and the last step, which lands on σ = 0 (z = x̂0), is first order.
    Deterministic: generator and noise_fn are accepted for the common signature and unused.
    """
    alphas_cumprod = _alphas_cumprod(schedule)
    timesteps = dpmpp_2m_timesteps(
        schedule, num_steps=num_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset
    ).tolist()
    # ᾱ at each timestep, then 1 for the final σ = 0.
    abar = [float(alphas_cumprod[t]) for t in timesteps] + [1.0]
    x = x_T
    batch = x.shape[0]
    x0_prev: Tensor | None = None
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="DPM++ 2M")):
        abar_s, abar_t = abar[i], abar[i + 1]
        alpha_s, sigma_s = math.sqrt(abar_s), math.sqrt(1.0 - abar_s)
        alpha_t, sigma_t = math.sqrt(abar_t), math.sqrt(1.0 - abar_t)

        pred = model_fn(x, _timestep_batch(t, batch, x.device, integral=True))
        x0, _ = pred_to_x0_eps(pred, x, abar_s, prediction_type)

        # e^{−h} = (α_s·σ_t)/(σ_s·α_t), formed without logs so that ᾱ_s = 0 (λ = −∞) and σ_t = 0 are exact.
        exp_neg_h = (alpha_s * sigma_t) / (sigma_s * alpha_t)
        last = i == len(timesteps) - 1
        if x0_prev is None or last:
            denoised = x0
        else:
            h = _log_snr(abar_t) - _log_snr(abar_s)
            h_prev = _log_snr(abar_s) - _log_snr(abar[i - 1])
            # D1 = (D0 − D_prev)/r0 with r0 = h_prev/h; an infinite h_prev (a ᾱ = 0 start) gives D1 = 0.
            d1_scale = h / h_prev if math.isfinite(h_prev) else 0.0
            denoised = x0 + 0.5 * d1_scale * (x0 - x0_prev)
        x_next = (sigma_t / sigma_s) * x - alpha_t * (exp_neg_h - 1.0) * denoised
        x0_prev = x0
        x = run_callback(callback, x_next.to(x_T.dtype), {"i": i, "t": t, "x0_pred": x0})
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    *,
    num_steps: int = 50,
    eta: float = 1.0,
    timestep_spacing: TimestepSpacing = "linspace",
    steps_offset: int = 0,
    prediction_type: str = "eps",
    generator: torch.Generator | None = None,
    noise_fn: NoiseFn | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler ancestral in σ space (k-diffusion `sample_euler_ancestral`; diffusers'
    EulerAncestralDiscreteScheduler at η = 1).

    Each step splits the move from σ to σ_next into a deterministic Euler step down to σ_down and fresh noise
    of scale σ_up:
        σ_up = min(σ_next, η·√(σ_next²·(σ² − σ_next²)/σ²)),  σ_down = √(σ_next² − σ_up²)
        x_σ ← x_σ + (x_σ − x̂0)/σ·(σ_down − σ) + σ_up·z
    σ at a fractional timestep is interpolated linearly in t between the training σ's (as diffusers).

    The walk starts at x_σ = z_T·√(1 + σ_max²), the σ-space point of the VP sample z_T = x_T, so x_T means
    the same here as for DDIM. (diffusers' init_noise_sigma for linspace/trailing spacing is σ_max instead:
    0.2 % smaller at SD's σ_max = 14.6.)
    """
    alphas_cumprod = _alphas_cumprod(schedule)
    declared = euler_ancestral_timesteps(
        schedule, num_steps=num_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset
    )
    integral = declared.dtype == torch.long
    timesteps = declared.tolist()
    train_sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)  # (T,) float64
    sigmas = [float(s) for s in np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)] + [0.0]

    x = x_T * math.sqrt(1.0 + sigmas[0] ** 2)  # σ space
    batch = x.shape[0]
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="Euler a")):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        abar = 1.0 / (1.0 + sigma**2)  # the ᾱ this σ stands for
        z = x * math.sqrt(abar)  # (B, ...) the VP sample the network was trained on
        pred = model_fn(z.to(x_T.dtype), _timestep_batch(t, batch, x.device, integral))
        x0, _ = pred_to_x0_eps(pred, z, abar, prediction_type)

        sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        derivative = (x - x0) / sigma
        x = x + derivative * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + sigma_up * step_noise(i, x, noise_fn, generator)

        scale_next = math.sqrt(1.0 + sigma_next**2)
        z_next = (x / scale_next).to(x_T.dtype)
        replaced = run_callback(callback, z_next, {"i": i, "t": t, "x0_pred": x0})
        # Only a replaced sample is mapped back: the common path keeps x_σ bit for bit.
        if replaced is not z_next:
            x = replaced * scale_next
    return (x / math.sqrt(1.0 + sigmas[-1] ** 2)).to(x_T.dtype)


__all__ = [
    "dpm_solver_timesteps",
    "dpmpp_2m_timesteps",
    "euler_ancestral_timesteps",
    "euler_timesteps",
    "sample_dpmpp_2m",
    "sample_euler_ancestral",
]
