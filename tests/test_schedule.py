"""The noise schedule against diffusers' schedulers as the oracle."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

from ldm.diffusion import NoiseSchedule, make_betas, rescale_zero_terminal_snr, sampling_timesteps

# (our kind, diffusers' beta_schedule, linear_start, linear_end)
SCHEDULES = [
    ("linear", "linear", 1e-4, 0.02),
    ("linear", "linear", 0.00085, 0.012),
    ("scaled_linear", "scaled_linear", 0.00085, 0.012),
    ("cosine", "squaredcos_cap_v2", 1e-4, 0.02),
]


def _diffusers_ddpm(kind: str, start: float, end: float, zero_snr: bool) -> DDPMScheduler:
    return DDPMScheduler(beta_schedule=kind, beta_start=start, beta_end=end, rescale_betas_zero_snr=zero_snr)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("kind,df_kind,start,end", SCHEDULES)
def test_alphas_cumprod_match_diffusers(kind, df_kind, start, end, zero_snr):
    ours = NoiseSchedule(kind, 1000, start, end, zero_terminal_snr=zero_snr)
    theirs = _diffusers_ddpm(df_kind, start, end, zero_snr)
    assert ours.alphas_cumprod.dtype == torch.float32
    # diffusers accumulates the cumprod in float32, we in float64: allow float32 round-off.
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.betas, theirs.betas, atol=1e-5, rtol=1e-4)


def test_zero_terminal_snr_properties():
    betas = make_betas("scaled_linear")
    rescaled = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1 - rescaled, 0)
    assert alphas_cumprod[-1] == 0
    torch.testing.assert_close(alphas_cumprod[0], torch.cumprod(1 - betas, 0)[0])
    schedule = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    assert schedule.snr(torch.tensor([999])).item() == 0


def test_unknown_beta_schedule():
    with pytest.raises(ValueError, match="scaled_linear"):
        make_betas("quadratic")


SPACING_CASES = [
    (spacing, n, offset)
    for spacing in ("leading", "trailing", "linspace")
    for n in (1, 7, 10, 25, 48, 50, 96, 100, 333, 999)
    for offset in (0, 1)
]


@pytest.mark.parametrize("spacing,num_steps,offset", SPACING_CASES)
def test_sampling_timesteps_match_ddim_scheduler(spacing, num_steps, offset):
    scheduler = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(num_steps)
    ours = sampling_timesteps(num_steps, 1000, spacing, offset)
    assert ours.dtype == torch.long
    assert torch.equal(ours, scheduler.timesteps)


@pytest.mark.parametrize("spacing,num_steps,offset", SPACING_CASES + [("trailing", 61, 0), ("trailing", 103, 0)])
def test_sampling_timesteps_match_dpm_solver_and_euler_schedulers(spacing, num_steps, offset):
    """The same rule, with the lowest of N + 1 points dropped (DPM-Solver) or unrounded (Euler), is what
    diffusers' other two schedulers visit."""
    for scheduler_class, options, dtype in (
        (DPMSolverMultistepScheduler, {"drop_lowest": True}, torch.long),
        (EulerAncestralDiscreteScheduler, {"integral": False}, torch.float32),
    ):
        scheduler = scheduler_class(timestep_spacing=spacing, steps_offset=offset)
        scheduler.set_timesteps(num_steps)
        theirs = scheduler.timesteps
        if theirs.max() > 999:
            # DPM-Solver, leading, N = 999, offset 1 reaches t = 1000, past the last training step: refused.
            with pytest.raises(ValueError, match="outside"):
                sampling_timesteps(num_steps, 1000, spacing, offset, **options)
            continue
        ours = sampling_timesteps(num_steps, 1000, spacing, offset, **options)
        assert ours.dtype == dtype
        # Where numpy's float arange overshoots (trailing, N = 61), those schedulers keep the extra element,
        # timestep −1; the one rule keeps the first N, as DDIMScheduler does.
        if len(theirs) == num_steps + 1:
            assert spacing == "trailing" and theirs[-1] == -1
            theirs = theirs[:num_steps]
        assert torch.equal(ours, theirs.to(dtype))


def test_trailing_keeps_exactly_n_steps():
    # numpy's float arange yields N + 1 values for N = 61 (the last one rounds to −1).
    ours = sampling_timesteps(61, 1000, "trailing")
    assert ours.numel() == 61 and ours.min() >= 0 and ours[0] == 999


def test_sampling_timesteps_errors():
    with pytest.raises(ValueError, match="num_steps"):
        sampling_timesteps(1001, 1000)
    with pytest.raises(ValueError, match="spacing"):
        sampling_timesteps(50, 1000, "karras")
    with pytest.raises(ValueError, match="outside"):
        sampling_timesteps(1000, 1000, "leading", steps_offset=1)


def test_add_noise_and_snr_match_diffusers():
    ours = NoiseSchedule("scaled_linear")
    theirs = _diffusers_ddpm("scaled_linear", 0.00085, 0.012, False)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=gen)
    eps = torch.randn(4, 3, 5, 5, generator=gen)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, eps, t), theirs.add_noise(x0, eps, t), atol=1e-5, rtol=1e-5)

    from diffusers.training_utils import compute_snr

    torch.testing.assert_close(ours.snr(t), compute_snr(theirs, t), atol=1e-6, rtol=1e-5)


def test_add_noise_keeps_dtype():
    schedule = NoiseSchedule()
    x0 = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    x_t = schedule.add_noise(x0, torch.randn_like(x0), torch.tensor([1, 900]))
    assert x_t.dtype == torch.bfloat16


def test_sample_timesteps_range_and_determinism():
    schedule = NoiseSchedule(num_timesteps=10)
    t1 = schedule.sample_timesteps(1000, generator=torch.Generator().manual_seed(3))
    t2 = schedule.sample_timesteps(1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and t1.dtype == torch.long
    assert t1.min() == 0 and t1.max() == 9


def test_schedule_stays_float32_when_parent_is_cast():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), NoiseSchedule())
    model.to(torch.bfloat16)
    schedule = model[1]
    assert schedule.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(schedule.alphas_cumprod, NoiseSchedule().alphas_cumprod)
    assert "alphas_cumprod" not in model.state_dict()
