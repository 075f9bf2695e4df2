"""The diffusion process, kept apart from the network and the training loop.

schedule (betas, ᾱ, x_t, SNR, the timestep spacing of every sampler) → objectives (eps / v / x0 targets, loss
weights) → samplers (DDIM, DDPM, DPM-Solver++(2M), Euler ancestral, one signature: sampler_common) → guidance
(classifier-free guidance as a model_fn wrapper).
"""

from ldm.diffusion.guidance import DEFAULT_CFG_SCALE, cfg_model_fn, rescale_noise_cfg
from ldm.diffusion.k_samplers import sample_dpmpp_2m, sample_euler_ancestral
from ldm.diffusion.objectives import (
    PREDICTION_TYPES,
    diffusion_loss,
    min_snr_weight,
    normalize_prediction_type,
    pred_to_x0_eps,
    sample_noise,
    sample_offset_noise,
    training_target,
    v_target,
)
from ldm.diffusion.samplers import SAMPLERS, get_sampler, sample_ddim, sample_ddpm, sampler_timesteps
from ldm.diffusion.schedule import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    NoiseSchedule,
    append_dims,
    make_betas,
    rescale_zero_terminal_snr,
    sampling_timesteps,
)

__all__ = [
    "BETA_SCHEDULES",
    "DEFAULT_CFG_SCALE",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "TIMESTEP_SPACINGS",
    "NoiseSchedule",
    "append_dims",
    "cfg_model_fn",
    "diffusion_loss",
    "get_sampler",
    "make_betas",
    "min_snr_weight",
    "normalize_prediction_type",
    "pred_to_x0_eps",
    "rescale_noise_cfg",
    "rescale_zero_terminal_snr",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler_ancestral",
    "sample_noise",
    "sample_offset_noise",
    "sampler_timesteps",
    "sampling_timesteps",
    "training_target",
    "v_target",
]
