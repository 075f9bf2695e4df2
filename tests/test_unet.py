import pytest
import torch

from diffusers_oracle import diffusers_unet_from_ours, unet_config
from ldm.modules.unet import UNetModel
from ldm.presets import unet_preset

SD1 = unet_preset("sd1")
SD2 = unet_preset("sd2")
SMALL = dict(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
    num_heads=2, context_dim=24,
)
SMALL_SD2_STYLE = dict(
    model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(1, 2),
    num_heads=None, head_dim=16, context_dim=24, use_linear_projection=True,
)


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("cfg, expected", [(SD1, 859_520_964), (SD2, 865_910_724)], ids=["sd1", "sd2"])
def test_sd_parameter_counts(cfg, expected):
    with torch.device("meta"):  # no memory, no init cost
        assert count(UNetModel(**cfg)) == expected


@pytest.mark.parametrize("cfg", [SMALL, SMALL_SD2_STYLE], ids=["conv-proj", "linear-proj"])
def test_parameter_count_equals_diffusers(cfg):
    from diffusers import UNet2DConditionModel

    assert count(UNetModel(**cfg)) == count(UNet2DConditionModel(**unet_config(cfg)))


@pytest.mark.parametrize("cfg", [SMALL, SMALL_SD2_STYLE], ids=["conv-proj", "linear-proj"])
def test_forward_equals_diffusers(cfg):
    ours = UNetModel(**cfg).eval()
    # Non-zero weights everywhere, so zero-initialised output layers do not hide a wrong path.
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    theirs = diffusers_unet_from_ours(ours, cfg)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 900])
    context = torch.randn(2, 7, cfg["context_dim"])
    with torch.no_grad():
        ref = theirs(x, t, encoder_hidden_states=context).sample
        out = ours(x, t, context=context)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_masked_context_positions_have_no_effect():
    unet = UNetModel(**SMALL).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    context = torch.randn(1, 6, 24)
    mask = torch.tensor([[True, True, True, False, False, False]])
    altered = context.clone()
    altered[:, 3:] = torch.randn(1, 3, 24) * 10
    with torch.no_grad():
        a = unet(x, t, context, mask)
        b = unet(x, t, altered, mask)
        c = unet(x, t, altered, None)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(a, c, atol=1e-4)


def test_forward_backward_and_checkpointing_agree():
    torch.manual_seed(1)
    plain = UNetModel(**SMALL, dropout=0.0)
    ckpt = UNetModel(**SMALL, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 24)
    target = torch.randn_like(x)
    grads = []
    for model in (plain, ckpt):
        model.train()
        model.zero_grad()
        out = model(x, t, context)
        assert out.shape == x.shape
        (out - target).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    # The zero-initialised output conv gets a gradient at once; the rest only after it moves.
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_head_arguments_are_exclusive():
    with pytest.raises(ValueError, match="exactly one"):
        UNetModel(**{**SMALL, "head_dim": 16})
    with pytest.raises(ValueError, match="exactly one"):
        UNetModel(**{**SMALL, "num_heads": None})


def test_bad_input_sizes_are_named():
    unet = UNetModel(**SMALL)
    with pytest.raises(ValueError, match="divisible by 2"):
        unet(torch.randn(1, 4, 9, 9), torch.tensor([1]), torch.randn(1, 3, 24))
    with pytest.raises(ValueError, match="width 16"):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 3, 16))
