"""What every sampler shares: its signature, how it draws per-step noise and how it reports each step.

A sampler is a pure function sampler(model_fn, x_T, schedule, *, num_steps, ...) → x_0 (k-diffusion's shape).
`model_fn(x_t, t)` gets x_t (B, ...) and t as a (B,) tensor on x_t's device and returns the prediction of
`prediction_type` (eps, v or x0). Samplers never look inside the model, never choose a device and keep the
sample in x_T's dtype.

Per-step noise comes from `noise_fn(step_index, shape)` if given (tests feed two implementations the same
noise this way), else from `generator`, else from the global RNG.

`callback(info)` runs after every step with info = {"i": step index, "t": timestep, "x": the sample after the
step, "x0_pred": the x0 prediction at t}. If it returns a tensor, that tensor replaces the sample (latent
blending in prompt editing needs this).

Every sampler also declares the timesteps it will visit, as a `TimestepsFn` taking the sampler's own keyword
options, so that code which acts per step (attention editing) can know them without running a model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from ldm.diffusion.objectives import ModelFn, sample_noise
from ldm.diffusion.schedule import NoiseSchedule

NoiseFn = Callable[[int, tuple[int, ...]], Tensor]
Callback = Callable[[dict[str, Any]], "Tensor | None"]


class Sampler(Protocol):
    def __call__(self, model_fn: ModelFn, x_T: Tensor, schedule: NoiseSchedule, **kwargs: Any) -> Tensor: ...


class TimestepsFn(Protocol):
    """schedule, the sampler's keyword options → the (N,) timesteps its model_fn receives, in order (int64,
    or float32 where the sampler passes fractional timesteps). Options that do not move the timesteps
    (eta, prediction_type, generator, …) are accepted and ignored, so a sampler's options can be passed as
    they are."""

    def __call__(self, schedule: NoiseSchedule, **options: Any) -> Tensor: ...


def step_noise(i: int, x: Tensor, noise_fn: NoiseFn | None, generator: torch.Generator | None) -> Tensor:
    """The fresh noise of step i, shaped and typed like x."""
    if noise_fn is not None:
        return noise_fn(i, tuple(x.shape)).to(device=x.device, dtype=x.dtype)
    return sample_noise(tuple(x.shape), x, generator)


def run_callback(callback: Callback | None, x: Tensor, info: dict[str, Any]) -> Tensor:
    """Calls the step callback with the sample after the step; returns the sample to continue from."""
    if callback is None:
        return x
    replaced = callback({**info, "x": x})
    return x if replaced is None else replaced


__all__ = ["Callback", "NoiseFn", "Sampler", "TimestepsFn", "run_callback", "step_noise"]
