"""Reverse-process samplers: pure functions with one signature, sampler(model_fn, x_T, schedule, *, ...).

`model_fn(x_t, t)` gets x_t (B, ...) and t as a (B,) long tensor on x_t's device and returns the prediction
of `prediction_type` (eps, v or x0). Samplers never look inside the model, never choose a device and keep the
sample in x_T's dtype. The schedule's ᾱ values enter as Python floats (float64).

Per-step noise comes from `noise_fn(step_index, shape)` if given (tests feed two implementations the same
noise this way), else from `generator`, else from the global RNG.

`callback(info)` runs after every step with info = {"i": step index, "t": timestep, "x": the sample after the
step, "x0_pred": the x0 prediction at t}. If it returns a tensor, that tensor replaces the sample (latent
blending in prompt editing needs this).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.diffusion.objectives import ModelFn, pred_to_x0_eps, sample_noise
from ldm.diffusion.schedule import NoiseSchedule, TimestepSpacing, sampling_timesteps

NoiseFn = Callable[[int, tuple[int, ...]], Tensor]
Callback = Callable[[dict[str, Any]], "Tensor | None"]
VarianceType = Literal["fixed_small", "fixed_large"]

# x0 predictions are clipped to the data range [−1, 1] when clip_sample is on (pixel-space models; latents
# are not bounded, which is why SD samples without clipping).
CLIP_SAMPLE_RANGE = 1.0
# Floor on the DDPM posterior variance, whose value at the last step is 0 (CompVis clips its log here).
POSTERIOR_VARIANCE_FLOOR = 1e-20


class Sampler(Protocol):
    def __call__(self, model_fn: ModelFn, x_T: Tensor, schedule: NoiseSchedule, **kwargs: Any) -> Tensor: ...


def _step_noise(i: int, x: Tensor, noise_fn: NoiseFn | None, generator: torch.Generator | None) -> Tensor:
    if noise_fn is not None:
        return noise_fn(i, tuple(x.shape)).to(device=x.device, dtype=x.dtype)
    return sample_noise(tuple(x.shape), x, generator)


def _run_callback(callback: Callback | None, x: Tensor, info: dict[str, Any]) -> Tensor:
    if callback is None:
        return x
    replaced = callback({**info, "x": x})
    return x if replaced is None else replaced


def _alphas_cumprod_host(schedule: NoiseSchedule) -> list[float]:
    # Host-side float64 values: no device sync per step, and no float32 cancellation in 1 − ᾱ_t/ᾱ_prev.
    return schedule.alphas_cumprod_float64().tolist()


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    *,
    num_steps: int = 50,
    eta: float = 0.0,
    timestep_spacing: TimestepSpacing = "leading",
    steps_offset: int = 1,
    set_alpha_to_one: bool = False,
    prediction_type: str = "eps",
    clip_sample: bool = False,
    generator: torch.Generator | None = None,
    noise_fn: NoiseFn | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2021): x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ²)·ε̂ + σ·z.

    σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev): η = 0 is deterministic, η = 1 is DDPM-like. The previous
    timestep is the next one in the sampling schedule; after the last, ᾱ_prev = 1 if set_alpha_to_one else
    ᾱ_0. Defaults are Stable Diffusion's (leading spacing, steps_offset = 1, no clipping).

    With clip_sample the clipped x̂0 is used for the mean but ε̂ stays the model's (diffusers' default).
    """
    alphas_cumprod = _alphas_cumprod_host(schedule)
    timesteps = sampling_timesteps(num_steps, schedule.num_timesteps, timestep_spacing, steps_offset).tolist()
    final_alpha_cumprod = 1.0 if set_alpha_to_one else alphas_cumprod[0]
    x = x_T
    batch = x.shape[0]
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="DDIM")):
        alpha_t = alphas_cumprod[t]
        alpha_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else final_alpha_cumprod

        t_batch = torch.full((batch,), t, dtype=torch.long, device=x.device)  # (B,)
        pred = model_fn(x, t_batch)
        x0, eps = pred_to_x0_eps(pred, x, alpha_t, prediction_type)
        if clip_sample:
            x0 = x0.clamp(-CLIP_SAMPLE_RANGE, CLIP_SAMPLE_RANGE)

        sigma = eta * math.sqrt((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev))
        # max(0, ·) guards against rounding just below zero when η = 1.
        direction = math.sqrt(max(1 - alpha_prev - sigma**2, 0.0))
        x_prev = math.sqrt(alpha_prev) * x0 + direction * eps
        if eta > 0:
            x_prev = x_prev + sigma * _step_noise(i, x, noise_fn, generator)
        x = _run_callback(callback, x_prev.to(x_T.dtype), {"i": i, "t": t, "x0_pred": x0})
    return x


@torch.no_grad()
def sample_ddpm(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    *,
    num_steps: int | None = None,
    timestep_spacing: TimestepSpacing = "leading",
    steps_offset: int = 0,
    variance_type: VarianceType = "fixed_small",
    prediction_type: str = "eps",
    clip_sample: bool = False,
    generator: torch.Generator | None = None,
    noise_fn: NoiseFn | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x̂0) (Ho et al. 2020).

    num_steps = None visits every training timestep. Fewer steps skip along the sampling schedule, with the
    effective β_t = 1 − ᾱ_t/ᾱ_prev of the skip (as diffusers' DDPMScheduler). After the last step ᾱ_prev = 1.
    Posterior mean: √ᾱ_prev·β_t/(1−ᾱ_t)·x̂0 + √α_t·(1−ᾱ_prev)/(1−ᾱ_t)·x_t.
    Variance: fixed_small = β̃_t = (1−ᾱ_prev)/(1−ᾱ_t)·β_t; fixed_large = β_t. No noise is added at t = 0.
    """
    if variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"unknown variance_type {variance_type!r}; choose 'fixed_small' or 'fixed_large'")
    alphas_cumprod = _alphas_cumprod_host(schedule)
    if num_steps is None:
        num_steps = schedule.num_timesteps
    timesteps = sampling_timesteps(num_steps, schedule.num_timesteps, timestep_spacing, steps_offset).tolist()
    x = x_T
    batch = x.shape[0]
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="DDPM")):
        alpha_cumprod_t = alphas_cumprod[t]
        alpha_cumprod_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        alpha_t = alpha_cumprod_t / alpha_cumprod_prev  # per-step α of this (possibly strided) transition
        beta_t = 1 - alpha_t

        t_batch = torch.full((batch,), t, dtype=torch.long, device=x.device)  # (B,)
        pred = model_fn(x, t_batch)
        x0, _ = pred_to_x0_eps(pred, x, alpha_cumprod_t, prediction_type)
        if clip_sample:
            x0 = x0.clamp(-CLIP_SAMPLE_RANGE, CLIP_SAMPLE_RANGE)

        x0_coef = math.sqrt(alpha_cumprod_prev) * beta_t / (1 - alpha_cumprod_t)
        x_t_coef = math.sqrt(alpha_t) * (1 - alpha_cumprod_prev) / (1 - alpha_cumprod_t)
        x_prev = x0_coef * x0 + x_t_coef * x
        if t > 0:
            posterior_variance = max(
                (1 - alpha_cumprod_prev) / (1 - alpha_cumprod_t) * beta_t, POSTERIOR_VARIANCE_FLOOR
            )
            variance = posterior_variance if variance_type == "fixed_small" else beta_t
            x_prev = x_prev + math.sqrt(variance) * _step_noise(i, x, noise_fn, generator)
        x = _run_callback(callback, x_prev.to(x_T.dtype), {"i": i, "t": t, "x0_pred": x0})
    return x


# σ-space samplers live in their own module, which imports the helpers above.
from ldm.diffusion.k_samplers import sample_dpmpp_2m, sample_euler_ancestral  # noqa: E402

SAMPLERS: dict[str, Sampler] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler_a": sample_euler_ancestral,
}


def get_sampler(name: str) -> Sampler:
    """The sampler function registered under `name` ("ddim" or "ddpm")."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
