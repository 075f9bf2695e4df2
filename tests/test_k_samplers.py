"""DPM-Solver++(2M) and Euler ancestral: against diffusers' schedulers, and convergence with the step count."""

import itertools
import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

from ldm.diffusion import SAMPLERS, NoiseSchedule, get_sampler, sample_ddim
from ldm.diffusion.k_samplers import (
    dpm_solver_timesteps,
    euler_timesteps,
    sample_dpmpp_2m,
    sample_euler_ancestral,
)

SHAPE = (2, 3, 4, 4)
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
# diffusers forms ᾱ by a float32 cumprod, σ in float32 and steps in float32; ε-prediction then divides by
# √ᾱ_t (1/14.6 at t = 999). Measured worst case over these cases: 5e-5 on samples of unit scale.
STOCK_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
PREDICTION_TYPES = [("eps", "epsilon"), ("v", "v_prediction")]
SPACINGS = [("linspace", 0), ("leading", 1), ("trailing", 0)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These tensors are tiny: a second intra-op thread only adds synchronisation, which costs seconds per
    # call when the cores are shared with other processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_prediction(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, deterministic stand-in for a network, depending on x and on (possibly fractional) t."""
    t = torch.as_tensor(t, device=x.device).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return 0.1 * x * torch.cos(t / 300) + 0.05 * torch.sin(x)


def _x_T(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _noises(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(SHAPE, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("num_steps", [1, 7, 25])
@pytest.mark.parametrize("spacing,offset", SPACINGS)
@pytest.mark.parametrize("ours_type,their_type", PREDICTION_TYPES)
def test_dpmpp_2m_matches_diffusers(ours_type, their_type, spacing, offset, num_steps):
    scheduler = DPMSolverMultistepScheduler(
        **SD, prediction_type=their_type, timestep_spacing=spacing, steps_offset=offset,
        solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
    )
    scheduler.set_timesteps(num_steps)
    assert scheduler.timesteps.tolist() == dpm_solver_timesteps(num_steps, 1000, spacing, offset)
    x = _x_T()
    for t in scheduler.timesteps:
        x = scheduler.step(fake_prediction(x, t.expand(SHAPE[0])), t, x).prev_sample
    ours = sample_dpmpp_2m(
        fake_prediction, _x_T(), NoiseSchedule(), num_steps=num_steps, timestep_spacing=spacing,
        steps_offset=offset, prediction_type=ours_type,
    )
    torch.testing.assert_close(ours, x, **STOCK_TOLERANCE)


@pytest.mark.parametrize("num_steps", [1, 7, 25])
@pytest.mark.parametrize("spacing,offset", SPACINGS)
@pytest.mark.parametrize("ours_type,their_type", PREDICTION_TYPES)
def test_euler_ancestral_matches_diffusers(ours_type, their_type, spacing, offset, num_steps, monkeypatch):
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as module

    noises = _noises(num_steps)
    calls = iter(noises)
    # The scheduler draws its step noise through randn_tensor, once per step: hand it ours, in order.
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kwargs: next(calls))
    scheduler = EulerAncestralDiscreteScheduler(
        **SD, prediction_type=their_type, timestep_spacing=spacing, steps_offset=offset
    )
    scheduler.set_timesteps(num_steps)
    assert scheduler.timesteps.tolist() == euler_timesteps(num_steps, 1000, spacing, offset)
    # Same σ-space start as ours: the VP sample x_T seen at σ_max (diffusers' own init_noise_sigma differs
    # for linspace/trailing spacing, see sample_euler_ancestral), so this compares the step rule.
    x = _x_T() * math.sqrt(1 + float(scheduler.sigmas[0]) ** 2)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(fake_prediction(model_input, t.expand(SHAPE[0])), t, x).prev_sample
    ours = sample_euler_ancestral(
        fake_prediction, _x_T(), NoiseSchedule(), num_steps=num_steps, timestep_spacing=spacing,
        steps_offset=offset, prediction_type=ours_type, noise_fn=lambda i, shape: noises[i],
    )
    torch.testing.assert_close(ours, x, **STOCK_TOLERANCE)


# Gaussian data x0 ~ N(MU, S²) has a closed-form ideal ε-predictor, a smooth function of x_t and t; its
# probability-flow ODE keeps (x_t − √ᾱ·MU)/√(ᾱ·S² + 1 − ᾱ) constant.
MU, S = 0.5, 0.3
CONVERGENCE_SHAPE = (1, 4, 64, 64)


def gaussian_data_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = NoiseSchedule().alphas_cumprod_float64()
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    t = t.double()
    low = t.floor().long().clamp(0, 999)
    high = (low + 1).clamp(max=999)
    frac = t - low
    sigma = sigmas[low] * (1 - frac) + sigmas[high] * frac  # linear in t, as the σ-space samplers interpolate
    abar = (1 / (1 + sigma**2)).reshape(-1, 1, 1, 1).to(x.dtype)
    return (1 - abar).sqrt() * (x - abar.sqrt() * MU) / (abar * S**2 + 1 - abar)


@pytest.fixture(scope="module")
def ddim_1000():
    x_T = torch.randn(CONVERGENCE_SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Every training step, ending on ᾱ = 1 (the ODE's end point, as the σ-space samplers' last step).
    reference = sample_ddim(
        gaussian_data_eps, x_T, NoiseSchedule(), num_steps=1000, timestep_spacing="linspace", set_alpha_to_one=True
    )
    return x_T, reference


def test_dpmpp_2m_converges_to_ddim_1000(ddim_1000):
    x_T, reference = ddim_1000
    distances = [
        (sample_dpmpp_2m(gaussian_data_eps, x_T, NoiseSchedule(), num_steps=n) - reference).norm().item()
        for n in (5, 10, 20, 50)
    ]
    assert all(a > b for a, b in itertools.pairwise(distances)), distances
    # The last step jumps from t ≈ T/N straight to x̂0 (first order, diffusers' final_sigmas_type="zero"), so
    # on this data the error falls about like 1/N: 20.7, 13.2, 7.5, 3.1.
    assert distances[-1] < 0.25 * distances[0]


def test_euler_ancestral_converges_to_ddim_1000(ddim_1000):
    """Euler ancestral is stochastic: its path never approaches the ODE's, its output distribution does.
    Compare mean and std over 16k independent elements (Monte-Carlo error of the std ≈ 0.002)."""
    x_T, reference = ddim_1000
    errors = []
    for n in (5, 10, 20, 50):
        out = sample_euler_ancestral(
            gaussian_data_eps, x_T, NoiseSchedule(), num_steps=n, generator=torch.Generator().manual_seed(n)
        )
        errors.append(math.hypot(out.mean() - reference.mean(), out.std() - reference.std()))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.5 * errors[0]


def test_dpmpp_2m_zero_terminal_snr_v_is_finite():
    out = sample_dpmpp_2m(
        fake_prediction, _x_T(), NoiseSchedule(zero_terminal_snr=True), num_steps=10,
        timestep_spacing="trailing", prediction_type="v",
    )
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler_a"])
def test_registered_and_callback_sees_vp_sample(name):
    assert SAMPLERS[name] is get_sampler(name)
    infos = []
    sampler = get_sampler(name)
    out = sampler(fake_prediction, _x_T(), NoiseSchedule(), num_steps=4, callback=infos.append,
                  generator=torch.Generator().manual_seed(0))
    assert [info["i"] for info in infos] == [0, 1, 2, 3]
    assert torch.equal(infos[-1]["x"], out)
    # A callback that hands the VP sample back unchanged changes nothing; one that replaces it is obeyed.
    same = sampler(fake_prediction, _x_T(), NoiseSchedule(), num_steps=4, callback=lambda info: info["x"].clone(),
                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, out, atol=1e-6, rtol=1e-6)
    zeroed = sampler(fake_prediction, _x_T(), NoiseSchedule(), num_steps=4,
                     callback=lambda info: torch.zeros_like(info["x"]))
    assert torch.equal(zeroed, torch.zeros(SHAPE))


def test_euler_ancestral_passes_fractional_timesteps_as_float():
    seen = []

    def model_fn(x, t):
        seen.append(t)
        return fake_prediction(x, t)

    sample_euler_ancestral(model_fn, _x_T(), NoiseSchedule(), num_steps=3, generator=torch.Generator().manual_seed(0))
    assert [round(float(t[0]), 1) for t in seen] == [999.0, 499.5, 0.0]
    assert all(t.dtype == torch.float32 and t.shape == (SHAPE[0],) for t in seen)
    seen.clear()
    sample_dpmpp_2m(model_fn, _x_T(), NoiseSchedule(), num_steps=3)
    assert [int(t[0]) for t in seen] == [999, 666, 333] and all(t.dtype == torch.long for t in seen)
