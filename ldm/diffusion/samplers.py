"""The sampler registry, and the two samplers that step between training timesteps on ᾱ: DDIM and DDPM.

Every sampler keeps one signature, sampler(model_fn, x_T, schedule, *, num_steps, ...) → x_0, and the noise
and callback conventions of `ldm.diffusion.sampler_common`. DDIM and DDPM take ᾱ as Python floats (float64);
the σ-space samplers (DPM-Solver++(2M), Euler ancestral) live in `ldm.diffusion.k_samplers`.

    SAMPLERS / get_sampler(name)                   name → sampler function
    sampler_timesteps(name, schedule, **options)   the timesteps that sampler visits, without running it
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.diffusion.k_samplers import (
    dpmpp_2m_timesteps,
    euler_ancestral_timesteps,
    sample_dpmpp_2m,
    sample_euler_ancestral,
)
from ldm.diffusion.objectives import ModelFn, pred_to_x0_eps
from ldm.diffusion.sampler_common import Callback, NoiseFn, Sampler, TimestepsFn, run_callback, step_noise
from ldm.diffusion.schedule import NoiseSchedule, TimestepSpacing, sampling_timesteps

VarianceType = Literal["fixed_small", "fixed_large"]

# x0 predictions are clipped to the data range [−1, 1] when clip_sample is on (pixel-space models; latents
# are not bounded, which is why SD samples without clipping).
CLIP_SAMPLE_RANGE = 1.0
# Floor on the DDPM posterior variance, whose value at the last step is 0 (CompVis clips its log here).
POSTERIOR_VARIANCE_FLOOR = 1e-20


def _alphas_cumprod_host(schedule: NoiseSchedule) -> list[float]:
    # Host-side float64 values: no device sync per step, and no float32 cancellation in 1 − ᾱ_t/ᾱ_prev.
    return schedule.alphas_cumprod_float64().tolist()


def ddim_timesteps(
    schedule: NoiseSchedule,
    *,
    num_steps: int = 50,
    timestep_spacing: TimestepSpacing = "leading",
    steps_offset: int = 1,
    **_other_options: Any,
) -> Tensor:
    """The (N,) int64 timesteps sample_ddim visits with these options (its defaults are the same)."""
    return sampling_timesteps(num_steps, schedule.num_timesteps, timestep_spacing, steps_offset)


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
    timesteps = ddim_timesteps(
        schedule, num_steps=num_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset
    ).tolist()
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
            x_prev = x_prev + sigma * step_noise(i, x, noise_fn, generator)
        x = run_callback(callback, x_prev.to(x_T.dtype), {"i": i, "t": t, "x0_pred": x0})
    return x


def ddpm_timesteps(
    schedule: NoiseSchedule,
    *,
    num_steps: int | None = None,
    timestep_spacing: TimestepSpacing = "leading",
    steps_offset: int = 0,
    **_other_options: Any,
) -> Tensor:
    """The (N,) int64 timesteps sample_ddpm visits with these options; num_steps None is every training step."""
    num_steps = schedule.num_timesteps if num_steps is None else num_steps
    return sampling_timesteps(num_steps, schedule.num_timesteps, timestep_spacing, steps_offset)


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
    timesteps = ddpm_timesteps(
        schedule, num_steps=num_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset
    ).tolist()
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
            x_prev = x_prev + math.sqrt(variance) * step_noise(i, x, noise_fn, generator)
        x = run_callback(callback, x_prev.to(x_T.dtype), {"i": i, "t": t, "x0_pred": x0})
    return x


SAMPLERS: dict[str, Sampler] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler_a": sample_euler_ancestral,
}
# The timesteps each registered sampler visits, declared next to it and computed by the same function it uses.
SAMPLER_TIMESTEPS: dict[str, TimestepsFn] = {
    "ddim": ddim_timesteps,
    "ddpm": ddpm_timesteps,
    "dpmpp_2m": dpmpp_2m_timesteps,
    "euler_a": euler_ancestral_timesteps,
}


def get_sampler(name: str) -> Sampler:
    """The sampler function registered under `name`:

    - "ddim": DDIM (Song et al. 2021); η = 0 deterministic, η = 1 DDPM-like. Defaults: 50 steps, leading
      spacing with steps_offset = 1 (Stable Diffusion's).
    - "ddpm": ancestral sampling from the DDPM posterior (Ho et al. 2020); every training step by default.
    - "dpmpp_2m": DPM-Solver++(2M) (Lu et al. 2022), a deterministic second-order multistep ODE solver;
      25 steps, linspace spacing.
    - "euler_a": Euler ancestral, an Euler step of the σ-space ODE (Karras et al. 2022) plus fresh noise
      (k-diffusion's sample_euler_ancestral); 50 steps, linspace spacing.
    """
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None


def sampler_timesteps(name: str, schedule: NoiseSchedule, **options: Any) -> Tensor:
    """The timesteps the sampler `name` passes to its model_fn, in order, for these sampler options: a (N,)
    tensor, int64 (float32 for Euler ancestral's fractional linspace timesteps), the dtype model_fn gets.

    No model runs. `options` are the sampler's keyword arguments as they would be passed to it; those that do
    not move the timesteps (eta, prediction_type, callback, …) are ignored.
    """
    get_sampler(name)  # one error message for an unknown name
    if name not in SAMPLER_TIMESTEPS:
        raise ValueError(f"sampler {name!r} declares no timesteps; samplers that do: {sorted(SAMPLER_TIMESTEPS)}")
    return SAMPLER_TIMESTEPS[name](schedule, **options)


__all__ = [
    "SAMPLERS",
    "SAMPLER_TIMESTEPS",
    "Callback",
    "NoiseFn",
    "Sampler",
    "ddim_timesteps",
    "ddpm_timesteps",
    "get_sampler",
    "sample_ddim",
    "sample_ddpm",
    "sampler_timesteps",
]
