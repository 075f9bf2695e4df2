"""The DDPM forward process: betas, alphas_cumprod, x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·eps, SNR, and sampling timesteps.

Naming follows diffusers (`scaled_linear` is what CompVis calls `linear`), so configs can be compared with
diffusers' scheduler configs directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

BetaSchedule = Literal["linear", "scaled_linear", "cosine"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]

BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "cosine")
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")

# Nichol & Dhariwal (2021) cap betas below 1 so that the cosine schedule never destroys the signal in one
# step near t = T; diffusers' `squaredcos_cap_v2` uses the same cap.
COSINE_MAX_BETA = 0.999


def make_betas(
    kind: BetaSchedule,
    num_timesteps: int = 1000,
    linear_start: float = 0.00085,
    linear_end: float = 0.012,
    cosine_s: float = 0.008,
) -> Tensor:
    """Betas of a training noise schedule, as a float64 tensor of shape (num_timesteps,).

    - "linear": β linear from linear_start to linear_end (plain DDPM: 1e-4 .. 0.02).
    - "scaled_linear": √β linear from √linear_start to √linear_end (Stable Diffusion: 0.00085 .. 0.012).
    - "cosine": ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), β_t = 1 − ᾱ(t+1)/ᾱ(t), capped at COSINE_MAX_BETA.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if kind == "linear":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps  # (T+1,) in [0, 1]
        alpha_bar = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
        return betas.clamp(max=COSINE_MAX_BETA)
    raise ValueError(f"unknown beta schedule {kind!r}; choose one of {BETA_SCHEDULES}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale √ᾱ so that ᾱ_T = 0 while ᾱ_0 is unchanged (Lin et al. 2023, Algorithm 1).

    Without this the last training step still leaks low-frequency signal, yet sampling starts from pure
    noise; with it ε-prediction is undefined at t = T, so pair it with v-prediction and trailing spacing.
    """
    sqrt_alphas_cumprod = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alphas_cumprod[0].clone(), sqrt_alphas_cumprod[-1].clone()
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * first / (first - last)
    alphas_cumprod = sqrt_alphas_cumprod**2
    # Recover the per-step α_t = ᾱ_t / ᾱ_{t−1}; α_0 = ᾱ_0.
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def sampling_timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    spacing: TimestepSpacing = "leading",
    steps_offset: int = 0,
    *,
    drop_lowest: bool = False,
    integral: bool = True,
) -> Tensor:
    """The descending training timesteps an N-step sampler visits: the one spacing rule of every sampler.

    The three spacings of diffusers' schedulers (Lin et al. 2023, Table 2, name them):
    - leading:  arange(N)·(T // N) reversed, + steps_offset (SD: steps_offset = 1 → 981, 961, …, 1).
    - trailing: round(arange(T, 0, −T/N)) − 1 (999, 979, …, 19): starts at the noisiest step.
    - linspace: linspace(0, T − 1, N) reversed, rounded when `integral`.
    steps_offset only shifts "leading", as in diffusers.

    drop_lowest: lay out N + 1 points and leave out the lowest, for solvers whose last step lands on σ = 0
        (ᾱ = 1) instead of on a training timestep (DPM-Solver). Trailing spacing never reaches its low end
        (t = 0 would be point N + 1), so it is unchanged.
    integral: round to integer timesteps and return int64; False keeps linspace's fractional timesteps and
        returns float32 (Euler samplers interpolate σ between training timesteps there).

    Returns a tensor of shape (N,) on the CPU, int64 or float32.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be between 1 and num_train_timesteps={num_train_timesteps}, got {num_steps}")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}")
    num_points = num_steps + 1 if drop_lowest and spacing != "trailing" else num_steps
    # numpy on purpose: its float arange/linspace land on exact .5 values differently from torch's, and
    # round-half-to-even then picks a different integer (e.g. trailing, N = 48: 937.5).
    if spacing == "leading":
        step_ratio = num_train_timesteps // num_points
        timesteps = np.arange(num_points, dtype=np.float64)[::-1] * step_ratio + steps_offset
    elif spacing == "trailing":
        step_ratio = num_train_timesteps / num_points
        # For some N (e.g. 61) the float arange overshoots by one element just above 0: keep the first N.
        timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio))[:num_points] - 1
    else:
        timesteps = np.linspace(0, num_train_timesteps - 1, num_points)[::-1]
    timesteps = timesteps[:num_steps]
    # float64 → float32 after the arithmetic, as diffusers' Euler schedulers do.
    timesteps = torch.from_numpy(timesteps.round().astype(np.int64) if integral else timesteps.astype(np.float32))
    if float(timesteps.max()) > num_train_timesteps - 1 or float(timesteps.min()) < 0:
        raise ValueError(
            f"{spacing} spacing with num_steps={num_steps}, steps_offset={steps_offset} gives timesteps outside "
            f"[0, {num_train_timesteps - 1}]; lower steps_offset or num_steps"
        )
    return timesteps


def append_dims(values: Tensor, ndim: int) -> Tensor:
    """(B,) → (B, 1, …, 1) with `ndim` dimensions, so per-sample scalars broadcast over a batch of images."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


class NoiseSchedule(nn.Module):
    """The discrete forward process q(x_t | x0) = N(√ᾱ_t·x0, (1 − ᾱ_t)·I) for t in [0, num_timesteps).

    The buffers are computed in float64 and stored in float32. They are not part of the state dict: they are
    a pure function of the constructor arguments, so a checkpoint never overrides the configured schedule.
    """

    betas: Tensor  # (T,) float32
    alphas_cumprod: Tensor  # (T,) float32

    def __init__(
        self,
        beta_schedule: BetaSchedule = "scaled_linear",
        num_timesteps: int = 1000,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        zero_terminal_snr: bool = False,
        cosine_s: float = 0.008,
    ) -> None:
        super().__init__()
        self.beta_schedule = beta_schedule
        self.num_timesteps = num_timesteps
        self.linear_start = linear_start
        self.linear_end = linear_end
        self.zero_terminal_snr = zero_terminal_snr
        self.cosine_s = cosine_s
        betas = make_betas(beta_schedule, num_timesteps, linear_start, linear_end, cosine_s)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        # Host-side float64 copies for samplers: the strided DDPM step needs 1 − ᾱ_t/ᾱ_prev, which loses
        # about four digits when formed from float32 values (ᾱ_t/ᾱ_prev is within 1e-3 of 1).
        self._betas_float64 = betas
        self._alphas_cumprod_float64 = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("betas", self._betas_float64.float(), persistent=False)
        self.register_buffer("alphas_cumprod", self._alphas_cumprod_float64.float(), persistent=False)

    def alphas_cumprod_float64(self) -> Tensor:
        """ᾱ as a float64 CPU tensor of shape (T,), for per-step scalar arithmetic in samplers."""
        return self._alphas_cumprod_float64

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> NoiseSchedule:
        # `.half()` / `.to(bfloat16)` on a parent model would round ᾱ to 3 significant digits (ᾱ near 1 and
        # near 0 is where the schedule matters most). Follow device moves, but always rebuild in float32.
        super()._apply(fn, recurse)
        if self.betas.dtype != torch.float32:
            device = self.betas.device
            self.betas = self._betas_float64.to(device=device, dtype=torch.float32)
            self.alphas_cumprod = self._alphas_cumprod_float64.to(device=device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return (
            f"beta_schedule={self.beta_schedule!r}, num_timesteps={self.num_timesteps}, "
            f"linear_start={self.linear_start}, linear_end={self.linear_end}, "
            f"zero_terminal_snr={self.zero_terminal_snr}"
        )

    def alphas_cumprod_at(self, t: Tensor) -> Tensor:
        """ᾱ_t for integer timesteps t of any shape, float32, on t's device."""
        return self.alphas_cumprod[t.to(self.alphas_cumprod.device)].to(t.device)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·eps. x0, eps: (B, ...); t: (B,) long. Returns x_t in x0's dtype."""
        alpha_cumprod = append_dims(self.alphas_cumprod_at(t.to(x0.device)), x0.ndim)  # (B, 1, ..., 1) float32
        # Mix in float32 (x0 may be bf16 latents) and hand back x0's dtype.
        x_t = alpha_cumprod.sqrt() * x0 + (1 - alpha_cumprod).sqrt() * eps
        return x_t.to(x0.dtype)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t), float32, same shape and device as t (0 at a zero-SNR end)."""
        alpha_cumprod = self.alphas_cumprod_at(t)
        return alpha_cumprod / (1 - alpha_cumprod)

    def sample_timesteps(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """t ~ Uniform{0, …, T − 1}, shape (batch,) long, on `device` (default: the schedule's device)."""
        device = self.alphas_cumprod.device if device is None else torch.device(device)
        # A generator only draws on its own device; draw there and move.
        draw_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=draw_device)
        return t.to(device)
