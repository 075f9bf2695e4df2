"""Prediction-type conversions and the weighted diffusion loss, with diffusers' schedulers as the oracle."""

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from ldm.diffusion import (
    NoiseSchedule,
    append_dims,
    diffusion_loss,
    min_snr_weight,
    normalize_prediction_type,
    pred_to_x0_eps,
    sample_offset_noise,
    training_target,
    v_target,
)

SHAPE = (6, 4, 8, 8)


def _randn(seed: int, shape=SHAPE, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _sd_pair():
    return NoiseSchedule("scaled_linear"), DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )


def fake_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.3 * x_t + 1e-3 * append_dims(t.to(x_t.dtype), x_t.ndim)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_conversions_round_trip(prediction_type):
    x0, eps = _randn(0, dtype=torch.float64), _randn(1, dtype=torch.float64)
    alpha_cumprod = append_dims(torch.tensor([0.9999, 0.9, 0.5, 0.1, 0.01, 0.0047], dtype=torch.float64), 4)
    x_t = alpha_cumprod.sqrt() * x0 + (1 - alpha_cumprod).sqrt() * eps
    pred = training_target(x0, eps, alpha_cumprod, prediction_type)
    x0_back, eps_back = pred_to_x0_eps(pred, x_t, alpha_cumprod, prediction_type)
    torch.testing.assert_close(x0_back, x0)
    torch.testing.assert_close(eps_back, eps)


def test_conversions_accept_python_float_alpha():
    x0, eps = _randn(0, dtype=torch.float64), _randn(1, dtype=torch.float64)
    alpha = 0.3
    x_t = alpha**0.5 * x0 + (1 - alpha) ** 0.5 * eps
    x0_back, eps_back = pred_to_x0_eps(v_target(x0, eps, alpha), x_t, alpha, "v_prediction")
    torch.testing.assert_close(x0_back, x0)
    torch.testing.assert_close(eps_back, eps)


def test_v_target_matches_diffusers_velocity():
    schedule, scheduler = _sd_pair()
    x0, eps = _randn(0), _randn(1)
    t = torch.tensor([0, 10, 250, 500, 750, 999])
    ours = v_target(x0, eps, append_dims(schedule.alphas_cumprod_at(t), 4))
    torch.testing.assert_close(ours, scheduler.get_velocity(x0, eps, t), atol=1e-5, rtol=1e-5)


def test_prediction_type_aliases():
    assert [normalize_prediction_type(n) for n in ("epsilon", "v_prediction", "sample")] == ["eps", "v", "x0"]
    assert [normalize_prediction_type(n) for n in ("eps", "v", "x0")] == ["eps", "v", "x0"]
    with pytest.raises(ValueError, match="epsilon"):
        normalize_prediction_type("score")


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_diffusion_loss_matches_hand_computation(prediction_type, gamma):
    schedule, scheduler = _sd_pair()
    x0, noise = _randn(0), _randn(1)
    t = torch.tensor([0, 3, 100, 400, 800, 999])
    loss, stats = diffusion_loss(
        fake_model, x0, schedule, prediction_type=prediction_type, min_snr_gamma=gamma, t=t, noise=noise
    )

    x_t = scheduler.add_noise(x0, noise, t)
    target = {"eps": noise, "v": scheduler.get_velocity(x0, noise, t), "x0": x0}[prediction_type]
    mse = ((fake_model(x_t, t) - target) ** 2).mean(dim=(1, 2, 3))
    snr = compute_snr(scheduler, t)
    if gamma is None:
        weight = torch.ones_like(snr)
    else:
        clipped = torch.minimum(snr, torch.full_like(snr, gamma))
        weight = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[prediction_type]
    torch.testing.assert_close(stats["mse"], mse, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats["weight"], weight, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(loss, (weight * mse).mean(), atol=1e-5, rtol=1e-4)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert torch.equal(stats["t"], t)


def test_min_snr_weight_is_finite_at_zero_snr():
    snr = NoiseSchedule(zero_terminal_snr=True).snr(torch.tensor([0, 500, 999]))
    assert snr[-1] == 0
    eps_weight = min_snr_weight(snr, 5.0, "eps")
    assert torch.isfinite(eps_weight).all() and eps_weight[-1] == 1
    assert min_snr_weight(snr, 5.0, "v")[-1] == 0


def test_loss_draws_reproducibly_and_trains():
    schedule = NoiseSchedule()
    x0 = _randn(0)
    run = lambda seed: diffusion_loss(  # noqa: E731
        fake_model, x0, schedule, generator=torch.Generator().manual_seed(seed)
    )
    (loss_a, stats_a), (loss_b, _), (loss_c, _) = run(7), run(7), run(8)
    assert torch.equal(loss_a, loss_b) and not torch.equal(loss_a, loss_c)
    assert set(stats_a) == {"t", "snr", "weight", "mse", "loss"}
    assert stats_a["t"].shape == (SHAPE[0],) and stats_a["t"].dtype == torch.long

    weight = torch.nn.Parameter(torch.tensor(0.5))
    loss, _ = diffusion_loss(lambda x_t, t: weight * x_t, x0, schedule, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert weight.grad is not None and torch.isfinite(weight.grad)


def test_loss_is_float32_for_bf16_inputs():
    x0 = _randn(0, dtype=torch.bfloat16)
    loss, stats = diffusion_loss(fake_model, x0, NoiseSchedule(), generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and stats["mse"].dtype == torch.float32


def _channel_means_of_noise(offset: float) -> torch.Tensor:
    """Run the loss on x0 = 0 at a fixed t, so the model sees x_t = √(1−ᾱ)·eps, and recover eps's means."""
    schedule = NoiseSchedule()
    shape = (16, 4, 16, 16)
    t = torch.full((shape[0],), 500)
    seen = {}

    def model_fn(x_t, t):
        seen["x_t"] = x_t
        return torch.zeros_like(x_t)

    diffusion_loss(
        model_fn, torch.zeros(shape), schedule, t=t, offset_noise=offset, generator=torch.Generator().manual_seed(0)
    )
    eps = seen["x_t"] / (1 - schedule.alphas_cumprod[500]).sqrt()
    return eps.mean(dim=(2, 3))  # (B, C)


def test_offset_noise_shifts_the_mean_per_channel():
    plain, offset = _channel_means_of_noise(0.0), _channel_means_of_noise(1.0)
    # Pure white noise: channel means ~ N(0, 1/256), std 1/16. With offset 1: std ≈ 1.
    assert plain.std() < 0.2
    assert offset.std() > 0.5
    # The shift is constant over the spatial grid: the offset noise minus white noise has zero spatial variance.
    gen = torch.Generator().manual_seed(0)
    x0 = torch.zeros(2, 3, 5, 5)
    with_offset = sample_offset_noise(x0, 0.1, torch.Generator().manual_seed(0))
    white = torch.randn(x0.shape, generator=gen)
    per_channel = torch.randn(2, 3, 1, 1, generator=gen)
    torch.testing.assert_close(with_offset, white + 0.1 * per_channel)
