import pytest
import torch

from diffusers_oracle import diffusers_vae_from_ours, vae_config
from ldm.modules.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm.modules.autoencoder_loss import AutoencoderLoss

# norm_group_channels=1: diffusers' 32 groups at every width (our default gives narrow layers fewer groups).
SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_group_channels=1)


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_sd_kl_f8_parameter_count():
    with torch.device("meta"):
        assert count(AutoencoderKL(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4)) == 83_653_863


def test_small_count_equals_diffusers():
    from diffusers import AutoencoderKL as TheirVAE

    assert count(AutoencoderKL(**SMALL)) == count(TheirVAE(**vae_config(SMALL)))


def test_encode_decode_equal_diffusers():
    ours = AutoencoderKL(**SMALL).eval()
    theirs = diffusers_vae_from_ours(ours, SMALL)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ours_post, their_post = ours.encode(x), theirs.encode(x).latent_dist
        torch.testing.assert_close(ours_post.mean, their_post.mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours_post.logvar, their_post.logvar, atol=1e-5, rtol=1e-4)
        z = ours_post.mean
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=1e-4)


def test_downsampling_factor_follows_ch_mult():
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
    assert vae.downsampling_factor == 4
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 32, 32)).mode()
    assert z.shape == (1, 4, 8, 8)


def test_posterior_kl_matches_closed_form_and_sampling():
    mean, logvar = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4) * 0.3
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), expected)
    assert torch.equal(post.mode(), mean)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(post.sample(g1), post.sample(g2))


def test_scale_factor_round_trip():
    vae = AutoencoderKL(**SMALL, scale_factor=0.5).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vae.encode_to_latent(x)
        torch.testing.assert_close(z, vae.encode(x).mode() * 0.5)
        torch.testing.assert_close(vae.decode_from_latent(z), vae.decode(z / 0.5))


def test_forward_backward_with_discriminator():
    vae = AutoencoderKL(**SMALL)
    loss_fn = AutoencoderLoss(kl_weight=1e-6, disc_enabled=True, disc_start=0, disc_layers=2, disc_channels=16)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_rec, post = vae(x)
    loss, logs = loss_fn.generator_loss(x, x_rec, post, step=1, last_layer=vae.decoder.conv_out.weight)
    loss.backward()
    assert all(p.grad is not None for p in vae.parameters())
    assert {"rec_loss", "kl_loss", "g_loss", "disc_adaptive_weight"} <= logs.keys()
    d_loss, d_logs = loss_fn.discriminator_loss(x, x_rec)
    d_loss.backward()
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())


def test_discriminator_waits_for_its_start_step():
    loss_fn = AutoencoderLoss(disc_enabled=True, disc_start=100, disc_layers=2, disc_channels=16)
    vae = AutoencoderKL(**SMALL)
    x = torch.rand(1, 3, 32, 32)
    x_rec, post = vae(x)
    _, logs = loss_fn.generator_loss(x, x_rec, post, step=99)
    assert "g_loss" not in logs
    _, logs = loss_fn.generator_loss(x, x_rec, post, step=100)
    assert "g_loss" in logs


def test_l2_and_kl_weight():
    x, x_rec = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)
    post = DiagonalGaussian(torch.cat([torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)], 1))
    loss, logs = AutoencoderLoss(rec_loss="l2", kl_weight=0.5).generator_loss(x, x_rec, post, step=0)
    # rec: per-sample sum of squared errors (3·8·8); KL of N(1, 1) vs N(0, 1) is 0.5 per element (16 elements).
    torch.testing.assert_close(loss, torch.tensor(3 * 8 * 8 + 0.5 * 0.5 * 16))


def test_lpips_requires_local_weights(tmp_path):
    with pytest.raises(ValueError, match="lpips_vgg_path"):
        AutoencoderLoss(perceptual_weight=1.0)
    with pytest.raises(FileNotFoundError, match="VGG16 weights not found"):
        AutoencoderLoss(perceptual_weight=1.0, lpips_vgg_path=str(tmp_path / "x.pth"), lpips_lin_path="y")


def test_lpips_loads_from_local_files(tmp_path):
    from torchvision.models import vgg16

    from ldm.modules.lpips import LPIPS

    torch.save(vgg16(weights=None).state_dict(), tmp_path / "vgg.pth")
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lin, tmp_path / "lin.pth")
    metric = LPIPS(tmp_path / "vgg.pth", tmp_path / "lin.pth")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(metric(x, x), torch.zeros(2))
    assert (metric(x, x.flip(-1)) > 0).all()


def test_lpips_reads_vgg16_convolutions_alone_and_names_a_wrong_file(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    from ldm.modules.lpips import LPIPS

    # VGG16's convolutions alone, as torchvision names them (its 124 M-parameter classifier plays no part)
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, tmp_path / "vgg.pth")
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lin, tmp_path / "lin.pth")
    metric = LPIPS(tmp_path / "vgg.pth", tmp_path / "lin.pth")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(metric(x, x), torch.zeros(2)) and (metric(x, x.flip(-1)) > 0).all()
    torch.save({"classifier.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth: not a torchvision vgg16 state dict"):
        LPIPS(tmp_path / "wrong.pth", tmp_path / "lin.pth")


def test_discriminator_takes_part_in_every_backward_before_it_starts():
    """Under DDP every parameter needs a gradient in every backward: before disc_start the discriminator's loss
    enters with weight 0 (CompVis's disc_factor 0), so it gets zero gradients and the autoencoder its own."""
    from ldm.training.autoencoder_module import AutoencoderModule

    module = AutoencoderModule(autoencoder=SMALL, loss={"disc_enabled": True, "disc_start": 10, "disc_channels": 8},
                               log_images_every_n_steps=0)
    module.training_step({"image": torch.rand(2, 3, 32, 32) * 2 - 1}, 0).backward()
    disc = list(module.loss.discriminator.parameters())
    assert all(p.grad is not None and not p.grad.any() for p in disc)
    assert all(p.grad is not None for p in module.autoencoder.parameters())
    assert any(p.grad.any() for p in module.autoencoder.parameters())
