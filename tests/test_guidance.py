"""Classifier-free guidance wrapper: one batched forward, the combination, and guidance rescale."""

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as diffusers_rescale

from ldm.diffusion import NoiseSchedule, cfg_model_fn, rescale_noise_cfg, sample_ddim

B, L, D = 3, 7, 5
X_SHAPE = (B, 4, 6, 6)


class FakeUNet:
    """Records every call; its output depends on x, t, the context and the mask so branches differ."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context=None, context_mask=None):
        self.calls.append({"batch": x.shape[0], "t": t, "context": context, "context_mask": context_mask})
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool)
        pooled = (context * context_mask[..., None]).sum(dim=(1, 2))  # (B,)
        return torch.sin(x) * pooled[:, None, None, None] + 1e-3 * t[:, None, None, None].to(x.dtype)


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(B, L, D, generator=gen)
    uncond = torch.randn(1, L, D, generator=gen)
    mask = torch.rand(B, L, generator=gen) > 0.3
    x = torch.randn(X_SHAPE, generator=gen)
    t = torch.tensor([999, 500, 1])
    return context, uncond, mask, x, t


def test_cfg_scale_one_runs_only_the_conditional_branch():
    context, _, mask, x, t = _inputs()
    unet = FakeUNet()
    out = cfg_model_fn(unet, context, mask, None, None, cfg_scale=1.0)(x, t)
    assert [c["batch"] for c in unet.calls] == [B]
    assert torch.equal(unet.calls[0]["context"], context)
    torch.testing.assert_close(out, FakeUNet()(x, t, context=context, context_mask=mask))


@pytest.mark.parametrize("with_masks", [True, False])
def test_cfg_is_one_batched_forward_of_uncond_then_cond(with_masks):
    context, uncond, mask, x, t = _inputs()
    uncond_mask = torch.ones(1, L, dtype=torch.bool) if with_masks else None
    unet = FakeUNet()
    scale = 7.5
    out = cfg_model_fn(unet, context, mask if with_masks else None, uncond, uncond_mask, cfg_scale=scale)(x, t)

    assert [c["batch"] for c in unet.calls] == [2 * B]
    call = unet.calls[0]
    assert torch.equal(call["t"], torch.cat([t, t]))
    assert torch.equal(call["context"][:B], uncond.expand(B, L, D))
    assert torch.equal(call["context"][B:], context)
    if with_masks:
        assert call["context_mask"].dtype == torch.bool and call["context_mask"].shape == (2 * B, L)
        assert torch.equal(call["context_mask"][B:], mask)
    else:
        assert call["context_mask"] is None

    reference = FakeUNet()
    eps_u = reference(x, t, context=uncond.expand(B, L, D), context_mask=uncond_mask)
    eps_c = reference(x, t, context=context, context_mask=mask if with_masks else None)
    torch.testing.assert_close(out, eps_u + scale * (eps_c - eps_u))


def test_missing_mask_on_one_side_means_attend_everywhere():
    context, uncond, mask, x, t = _inputs()
    unet = FakeUNet()
    cfg_model_fn(unet, context, mask, uncond, None, cfg_scale=3.0)(x, t)
    assert unet.calls[0]["context_mask"][:B].all()


def test_rescale_with_phi_zero_is_plain_cfg():
    context, uncond, mask, x, t = _inputs()
    plain = cfg_model_fn(FakeUNet(), context, mask, uncond, None, cfg_scale=5.0)(x, t)
    rescaled = cfg_model_fn(FakeUNet(), context, mask, uncond, None, cfg_scale=5.0, guidance_rescale=0.0)(x, t)
    assert torch.equal(plain, rescaled)
    torch.testing.assert_close(rescale_noise_cfg(plain, x, 0.0), plain)


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_rescale_matches_diffusers(phi):
    gen = torch.Generator().manual_seed(1)
    eps_cfg, eps_cond = torch.randn(X_SHAPE, generator=gen) * 3, torch.randn(X_SHAPE, generator=gen)
    torch.testing.assert_close(rescale_noise_cfg(eps_cfg, eps_cond, phi), diffusers_rescale(eps_cfg, eps_cond, phi))


def test_guided_rescaled_output_matches_diffusers_pipeline_math():
    context, uncond, mask, x, t = _inputs()
    out = cfg_model_fn(FakeUNet(), context, mask, uncond, None, cfg_scale=7.5, guidance_rescale=0.7)(x, t)
    reference = FakeUNet()
    eps_u = reference(x, t, context=uncond.expand(B, L, D))
    eps_c = reference(x, t, context=context, context_mask=mask)
    expected = diffusers_rescale(eps_u + 7.5 * (eps_c - eps_u), eps_c, guidance_rescale=0.7)
    torch.testing.assert_close(out, expected)


def test_context_length_mismatch_is_a_clear_error():
    context, _, mask, _, _ = _inputs()
    longer_uncond = torch.zeros(1, 2 * L, D)
    with pytest.raises(ValueError, match="same number of chunks"):
        cfg_model_fn(FakeUNet(), context, mask, longer_uncond, None, cfg_scale=7.5)
    with pytest.raises(ValueError, match="unconditional context"):
        cfg_model_fn(FakeUNet(), context, mask, None, None, cfg_scale=7.5)


def test_drives_a_sampler():
    context, uncond, mask, x, _ = _inputs()
    unet = FakeUNet()
    model_fn = cfg_model_fn(unet, context, mask, uncond, None, cfg_scale=2.0)
    out = sample_ddim(model_fn, x * 0.01, NoiseSchedule(), num_steps=3)
    assert out.shape == X_SHAPE and torch.isfinite(out).all()
    assert [c["batch"] for c in unet.calls] == [2 * B] * 3
