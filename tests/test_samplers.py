"""DDIM and DDPM trajectories against diffusers' DDIMScheduler / DDPMScheduler step loops."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ldm.diffusion import SAMPLERS, NoiseSchedule, get_sampler, sample_ddim, sample_ddpm, sampler_timesteps
from ldm.diffusion.samplers import SAMPLER_TIMESTEPS

SHAPE = (2, 3, 4, 4)
# Both sides run the same update rule on the same float64 numbers: only operation order differs.
TOLERANCE = dict(atol=1e-9, rtol=1e-9)
# Against a stock scheduler, ᾱ differs by float32 cumprod round-off (~1e-6 relative), amplified by 1/√ᾱ_t.
STOCK_TOLERANCE = dict(atol=1e-4, rtol=1e-4)


def fake_prediction(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, deterministic stand-in for a network: depends on x and t like a real predictor would."""
    t = torch.as_tensor(t, device=x.device).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return 0.1 * x * torch.cos(t / 300) + 0.05 * torch.sin(x)


def _x_T(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _noises(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(n)]


def _same_alphas_cumprod(scheduler, schedule: NoiseSchedule):
    """Give a diffusers scheduler our float64 ᾱ, so both sides run the update rule on identical numbers in
    float64 (ᾱ itself is compared in test_schedule). diffusers' native float32 arithmetic forms 1 − ᾱ_t/ᾱ_prev
    and √(1 − ᾱ_prev − σ²) with cancellation: ~1e-3 drift over 1000 DDPM steps, and a NaN at the first
    η = 1 step of a zero-terminal-SNR schedule."""
    scheduler.alphas_cumprod = schedule.alphas_cumprod_float64().clone()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if isinstance(scheduler, DDIMScheduler):
        final = 1.0 if scheduler.config.set_alpha_to_one else scheduler.alphas_cumprod[0]
        scheduler.final_alpha_cumprod = torch.as_tensor(final, dtype=torch.float64)
    return scheduler


def _diffusers_ddim_loop(scheduler: DDIMScheduler, x: torch.Tensor, num_steps: int, eta: float, noises, start=0):
    scheduler.set_timesteps(num_steps)
    for i, t in enumerate(scheduler.timesteps):
        if i < start:
            continue
        out = fake_prediction(x, t.expand(x.shape[0]))
        noise = noises[i] if eta > 0 else None
        x = scheduler.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
    return x


SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

DDIM_CASES = {
    # name: (diffusers scheduler kwargs, our schedule kwargs, our sampler kwargs)
    "sd": (
        dict(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False),
        dict(beta_schedule="scaled_linear"),
        dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False),
    ),
    "diffusers_defaults": (
        dict(),
        dict(beta_schedule="linear", linear_start=1e-4, linear_end=0.02),
        dict(steps_offset=0, set_alpha_to_one=True, clip_sample=True),
    ),
    "sd_v_prediction": (
        dict(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="v_prediction"),
        dict(beta_schedule="scaled_linear"),
        dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="v"),
    ),
    "sd_x0_prediction": (
        dict(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="sample"),
        dict(beta_schedule="scaled_linear"),
        dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="x0"),
    ),
    "trailing_zero_snr_v": (
        dict(
            **SD,
            timestep_spacing="trailing",
            rescale_betas_zero_snr=True,
            set_alpha_to_one=False,
            clip_sample=False,
            prediction_type="v_prediction",
        ),
        dict(beta_schedule="scaled_linear", zero_terminal_snr=True),
        dict(timestep_spacing="trailing", set_alpha_to_one=False, prediction_type="v_prediction"),
    ),
}


ZERO_SNR = "trailing_zero_snr_v"
DDIM_PARAMS = [
    (case, eta, num_steps)
    for case in sorted(DDIM_CASES)
    for eta in (0.0, 1.0)
    for num_steps in (10, 50)
    if not (case == ZERO_SNR and eta > 0)  # see test_ddim_zero_snr_eta_one
]


def _ours_ddim(case, eta, num_steps, noises, **overrides):
    _, schedule_kwargs, sampler_kwargs = DDIM_CASES[case]
    return sample_ddim(
        fake_prediction,
        _x_T(),
        NoiseSchedule(**schedule_kwargs),
        num_steps=num_steps,
        eta=eta,
        noise_fn=lambda i, shape: noises[i],
        **{**sampler_kwargs, **overrides},
    )


@pytest.mark.parametrize("case,eta,num_steps", DDIM_PARAMS)
def test_ddim_matches_diffusers(case, eta, num_steps):
    df_kwargs, schedule_kwargs, _ = DDIM_CASES[case]
    noises = _noises(num_steps)
    scheduler = _same_alphas_cumprod(DDIMScheduler(**df_kwargs), NoiseSchedule(**schedule_kwargs))
    expected = _diffusers_ddim_loop(scheduler, _x_T(), num_steps, eta, noises)
    ours = _ours_ddim(case, eta, num_steps, noises)
    assert ours.dtype == torch.float64
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected, **TOLERANCE)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sd_matches_stock_diffusers(eta):
    """End to end against an unmodified DDIMScheduler (its own float32 ᾱ and arithmetic)."""
    noises = _noises(50)
    expected = _diffusers_ddim_loop(DDIMScheduler(**DDIM_CASES["sd"][0]), _x_T(), 50, eta, noises)
    torch.testing.assert_close(_ours_ddim("sd", eta, 50, noises), expected, **STOCK_TOLERANCE)


@pytest.mark.parametrize("num_steps", [10, 50])
def test_ddim_zero_snr_eta_one(num_steps):
    """At t = T, ᾱ_T = 0 so σ = √(1 − ᾱ_prev) and the ε direction vanishes: x_prev = √ᾱ_prev·x̂0 + σ·z exactly.
    diffusers evaluates √(1 − ᾱ_prev − σ²) on a rounding residue there (NaN when it is negative), so the first
    step is checked by hand and the rest against diffusers from our first step onwards."""
    df_kwargs, schedule_kwargs, _ = DDIM_CASES[ZERO_SNR]
    schedule = NoiseSchedule(**schedule_kwargs)
    noises = _noises(num_steps)
    steps = []
    ours = _ours_ddim(ZERO_SNR, 1.0, num_steps, noises, callback=steps.append)
    assert torch.isfinite(ours).all()

    alphas_cumprod = schedule.alphas_cumprod_float64()
    first_t, next_t = steps[0]["t"], steps[1]["t"]
    assert first_t == 999 and alphas_cumprod[first_t] == 0
    alpha_prev = alphas_cumprod[next_t].item()
    x0 = -fake_prediction(_x_T(), torch.full((SHAPE[0],), first_t))  # v-prediction at ᾱ = 0: x0 = −v
    by_hand = alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * noises[0]
    torch.testing.assert_close(steps[0]["x"], by_hand, **TOLERANCE)

    scheduler = _same_alphas_cumprod(DDIMScheduler(**df_kwargs), schedule)
    expected = _diffusers_ddim_loop(scheduler, steps[0]["x"], num_steps, 1.0, noises, start=1)
    torch.testing.assert_close(ours, expected, **TOLERANCE)


def test_ddim_eta_zero_is_deterministic_and_ignores_noise():
    schedule = NoiseSchedule()
    a = sample_ddim(fake_prediction, _x_T(), schedule, num_steps=5, noise_fn=lambda i, s: torch.full(s, 1e3))
    b = sample_ddim(fake_prediction, _x_T(), schedule, num_steps=5)
    assert torch.equal(a, b)


def test_ddim_generator_reproducible():
    schedule = NoiseSchedule()
    run = lambda seed: sample_ddim(  # noqa: E731
        fake_prediction, _x_T(), schedule, num_steps=5, eta=1.0, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(run(4), run(4))
    assert not torch.equal(run(4), run(5))


def _diffusers_ddpm_loop(scheduler: DDPMScheduler, x, num_steps, noises, monkeypatch):
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    calls = iter(noises)
    # DDPMScheduler.step draws its noise through randn_tensor (only for t > 0): hand it ours, in order.
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda shape, **kwargs: next(calls))
    scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps:
        out = fake_prediction(x, t.expand(x.shape[0]))
        x = scheduler.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("num_steps", [None, 50])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_matches_diffusers(variance_type, num_steps, monkeypatch):
    steps = num_steps or 1000
    noises = _noises(steps)
    scheduler = DDPMScheduler(**SD, variance_type=variance_type, clip_sample=False)
    _same_alphas_cumprod(scheduler, NoiseSchedule("scaled_linear"))
    expected = _diffusers_ddpm_loop(scheduler, _x_T(), steps, noises, monkeypatch)
    ours = sample_ddpm(
        fake_prediction,
        _x_T(),
        NoiseSchedule("scaled_linear"),
        num_steps=num_steps,
        variance_type=variance_type,
        noise_fn=lambda i, shape: noises[i],
    )
    torch.testing.assert_close(ours, expected, **TOLERANCE)


def test_ddpm_v_prediction_clip_linear_matches_diffusers(monkeypatch):
    noises = _noises(20)
    scheduler = DDPMScheduler(prediction_type="v_prediction", clip_sample=True)
    _same_alphas_cumprod(scheduler, NoiseSchedule("linear", linear_start=1e-4, linear_end=0.02))
    expected = _diffusers_ddpm_loop(scheduler, _x_T(), 20, noises, monkeypatch)
    ours = sample_ddpm(
        fake_prediction,
        _x_T(),
        NoiseSchedule("linear", linear_start=1e-4, linear_end=0.02),
        num_steps=20,
        prediction_type="v",
        clip_sample=True,
        noise_fn=lambda i, shape: noises[i],
    )
    torch.testing.assert_close(ours, expected, **TOLERANCE)


def test_model_fn_gets_batched_long_timesteps_and_callback_runs():
    seen, infos = [], []

    def model_fn(x, t):
        seen.append(t)
        return fake_prediction(x, t)

    x_T = _x_T().float()
    out = sample_ddim(model_fn, x_T, NoiseSchedule(), num_steps=4, callback=infos.append)
    assert out.dtype == torch.float32 and out.shape == x_T.shape
    assert [int(t[0]) for t in seen] == [751, 501, 251, 1]
    assert all(t.dtype == torch.long and t.shape == (SHAPE[0],) for t in seen)
    assert [info["i"] for info in infos] == [0, 1, 2, 3]
    assert [info["t"] for info in infos] == [751, 501, 251, 1]
    assert torch.equal(infos[-1]["x"], out)
    assert infos[0]["x0_pred"].shape == x_T.shape


def test_callback_can_replace_the_sample():
    out = sample_ddpm(
        fake_prediction, _x_T(), NoiseSchedule(), num_steps=3, callback=lambda info: torch.zeros_like(info["x"])
    )
    assert torch.equal(out, torch.zeros(SHAPE, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_registry_and_progress(name):
    sampler = get_sampler(name)
    out = sampler(fake_prediction, _x_T(), NoiseSchedule(), num_steps=3, progress=True)
    assert out.shape == SHAPE and torch.isfinite(out).all()


# (training timesteps, sampler options): each sampler's defaults, every spacing, an offset, the N at which the
# trailing arange overshoots, an option that does not move the timesteps, and a schedule of another length.
TIMESTEP_CASES = [
    (1000, {}),
    (1000, {"num_steps": 9, "timestep_spacing": "linspace", "prediction_type": "v"}),
    (1000, {"num_steps": 7, "timestep_spacing": "trailing"}),
    (1000, {"num_steps": 61, "timestep_spacing": "trailing"}),
    (1000, {"num_steps": 5, "timestep_spacing": "leading", "steps_offset": 1}),
    (100, {"num_steps": 10}),
]


@pytest.mark.parametrize("num_timesteps,options", TIMESTEP_CASES)
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_declared_timesteps_are_the_visited_ones(name, num_timesteps, options):
    """sampler_timesteps says, without a model, exactly the t (values and dtype) each step's model_fn gets."""
    assert set(SAMPLER_TIMESTEPS) == set(SAMPLERS)
    schedule = NoiseSchedule(num_timesteps=num_timesteps)
    seen = []

    def model_fn(x, t):
        assert t.shape == (x.shape[0],) and (t == t[0]).all()
        seen.append(t[0])
        return fake_prediction(x, t)

    x_T = torch.randn(2, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    get_sampler(name)(model_fn, x_T, schedule, generator=torch.Generator().manual_seed(1), **options)
    declared = sampler_timesteps(name, schedule, **options)
    visited = torch.stack(seen)
    assert declared.dtype == visited.dtype and torch.equal(declared, visited), (declared, visited)
    if "num_steps" in options:
        assert len(declared) == options["num_steps"]
    assert 0 <= declared.min() and declared.max() <= num_timesteps - 1


def test_sampler_timesteps_of_an_unknown_sampler_lists_choices():
    with pytest.raises(ValueError, match="ddim.*ddpm.*dpmpp_2m.*euler_a"):
        sampler_timesteps("euler", NoiseSchedule(), num_steps=3)


def test_unknown_sampler_lists_choices():
    with pytest.raises(ValueError, match="ddim.*ddpm"):
        get_sampler("euler")


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction type"):
        sample_ddim(fake_prediction, _x_T(), NoiseSchedule(), num_steps=2, prediction_type="score")


def test_sampling_runs_without_grad():
    def model_fn(x, t):
        assert not torch.is_grad_enabled()
        return fake_prediction(x, t)

    sample_ddim(model_fn, _x_T(), NoiseSchedule(), num_steps=2)
