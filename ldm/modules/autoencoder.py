"""The KL-regularised autoencoder (Rombach et al. 2022, §3.1): image (B,3,H,W) ↔ latent z (B,c,H/f,W/f).

The encoder outputs the mean and log-variance of a diagonal Gaussian posterior q(z|x); the decoder maps a
latent back to pixels. The downsampling factor is f = 2^(len(ch_mult)-1). Module names follow the
latent-diffusion code (``encoder.down.N.block.M``, ``mid.attn_1``, ``quant_conv``, ...) so Stable Diffusion's
KL-f8 weights load key for key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


NORMS = ("group", "none")
# What a config saved before the normalisation could be chosen meant: CompVis' GroupNorm(32) at every width.
# Loaders of saved configs fill it in (``saved_config``); new configs state the three keys.
LEGACY_NORM = {"norm": "group", "norm_groups": 32, "norm_group_channels": 1}


@dataclass(frozen=True)
class NormSpec:
    """How the autoencoder normalises: GroupNorm with at most ``groups`` groups of at least ``group_channels``
    channels each, or no normalisation at all (``kind="none"``).

    GroupNorm normalises each image on its own. With one channel per group (SD's 32 groups in a 32-channel
    layer) that is instance normalisation: it removes how strongly each feature is switched on in the image,
    which is where a narrow autoencoder keeps colour, and the encoder learns to drop it. At least 4 channels per
    group keeps SD's 32 groups at its widths (128 channels and up) and never degenerates at narrow ones.
    """

    kind: str = "group"
    groups: int = 32
    group_channels: int = 4

    def __post_init__(self) -> None:
        if self.kind not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.kind!r}")
        if self.groups < 1 or self.group_channels < 1:
            raise ValueError(f"norm_groups and norm_group_channels must be >= 1, got {self.groups}, "
                             f"{self.group_channels}")

    def num_groups(self, channels: int) -> int:
        """The most groups (≤ groups, ≥ group_channels channels each) that divide ``channels`` evenly."""
        limit = max(1, min(self.groups, channels // self.group_channels))
        return max(g for g in range(1, limit + 1) if channels % g == 0)

    def __call__(self, channels: int) -> nn.Module:
        if self.kind == "none":
            return nn.Identity()
        return nn.GroupNorm(self.num_groups(channels), channels, eps=1e-6)


def saved_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """AutoencoderKL arguments of a config read from a checkpoint or a weights file: one saved before the
    normalisation was a setting (none of its keys) describes GroupNorm(32) at every width."""
    config = dict(config)
    if not any(key in config for key in LEGACY_NORM):
        config.update(LEGACY_NORM)
    return config


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm: NormSpec = NormSpec()):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1×1 conv projections."""

    def __init__(self, channels: int, norm: NormSpec = NormSpec()):
        super().__init__()
        self.norm = norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        # The 1×1 convs applied to tokens as the linear maps they are: q, k, v come out contiguous, which torch's
        # fused (flash) attention kernel needs; strided ones send it to the path that stores the HW×HW scores.
        q, k, v = (F.linear(tokens, p.weight.flatten(1), p.bias)[:, None] for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + out.transpose(1, 2).view(b, c, h, w)  # the add reads the transposed view


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right and bottom only), as in the original KL autoencoders.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: a list of ResnetBlocks and an optional resampler (attribute names are load keys)."""

    def __init__(self, blocks: list[nn.Module], resample_name: str | None = None, resample: nn.Module | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()  # no attention inside levels at SD's settings; kept for key layout
        if resample_name:
            self.add_module(resample_name, resample)


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, norm: NormSpec):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm)
        self.attn_1 = AttnBlock(channels, norm)
        self.block_2 = ResnetBlock(channels, channels, dropout, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        z_channels: int = 4,
        dropout: float = 0.0,
        norm: NormSpec = NormSpec(),
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout, norm))
                block_in = block_out
            last = level == len(ch_mult) - 1
            self.down.append(_Level(blocks, None if last else "downsample", None if last else Downsample(block_in)))
        self.mid = _Mid(block_in, dropout, norm)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        z_channels: int = 4,
        dropout: float = 0.0,
        norm: NormSpec = NormSpec(),
    ):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout, norm)
        # Built from the lowest resolution up, but stored so that up[level] is the level of the same index in
        # the encoder (the latent-diffusion key layout).
        levels: list[_Level] = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout, norm))
                block_in = block_out
            levels.insert(0, _Level(blocks, "upsample" if level else None, Upsample(block_in) if level else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def draw_latent(mean: torch.Tensor, std: torch.Tensor, generators: list[torch.Generator] | None = None
                ) -> torch.Tensor:
    """mean + std·ε in float32 (ε ~ N(0, I)): from one generator per sample, so that a sample's draw does not
    depend on the batch it is in, or else from the global RNG."""
    z = mean.float()
    if generators is None:
        noise = torch.randn(z.shape, device=z.device, dtype=z.dtype)
    else:
        noise = torch.stack([torch.randn(z.shape[1:], generator=g) for g in generators]).to(z)
    return z + std.to(z.device).float() * noise


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) from the encoder's 2c output channels."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # The clamp keeps exp() finite for an untrained encoder; the same bounds as latent-diffusion.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over the latent's dimensions: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        z_channels: int = 4,
        embed_dim: int | None = None,
        dropout: float = 0.0,
        scale_factor: float = 0.18215,
        norm: str = "group",
        norm_groups: int = 32,
        norm_group_channels: int = 4,
    ):
        """
        scale_factor: multiplies latents before diffusion so they have roughly unit variance (SD: 0.18215;
            a VAE trained here should set it to 1/std of its latents, which ``training`` measures).
        embed_dim: channels of the latent the diffusion model sees; defaults to z_channels.
        norm: "group" (GroupNorm) or "none" (no normalisation layers; their weights then are absent from the
            state dict). norm_groups: the most groups of a GroupNorm layer (SD: 32). norm_group_channels: the
            fewest channels per group, so that narrow layers get fewer groups instead of one channel each
            (instance normalisation, which loses colour: see NormSpec). The defaults give SD's KL-f8 exactly
            GroupNorm(32) everywhere; 1 gives 32 groups at every width, as CompVis' code and diffusers do.
        """
        super().__init__()
        embed_dim = embed_dim or z_channels
        self.norm = NormSpec(norm, norm_groups, norm_group_channels)
        self.encoder = Encoder(in_channels, ch, ch_mult, num_res_blocks, z_channels, dropout, self.norm)
        self.decoder = Decoder(in_channels, ch, ch_mult, num_res_blocks, z_channels, dropout, self.norm)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        self.downsampling_factor = 2 ** (len(ch_mult) - 1)
        self.scale_factor = scale_factor
        if self.norm.kind == "none":
            self._init_without_norm()

    def _init_without_norm(self) -> None:
        """Weights that carry the signal through an autoencoder without normalisation layers.

        PyTorch's default convolution init has variance 1/(3·fan_in): each layer shrinks activations about √3×,
        which GroupNorm undoes and nothing else does. Without it the output of a fresh model barely depends on its
        input (by ~10⁻⁴ across emoji), and training first spends hundreds of steps growing that path. Instead:
        variance 1/fan_in (LeCun), zero biases, and each residual branch's last layer (ResnetBlock.conv2,
        AttnBlock.proj_out) at zero, so that every block starts as the identity (as in Fixup / SkipInit).
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, ResnetBlock):
                nn.init.zeros_(module.conv2.weight)
            elif isinstance(module, AttnBlock):
                nn.init.zeros_(module.proj_out.weight)

    @property
    def norm_config(self) -> dict[str, Any]:
        """The normalisation as constructor arguments (``norm``, ``norm_groups``, ``norm_group_channels``)."""
        return {"norm": self.norm.kind, "norm_groups": self.norm.groups, "norm_group_channels": self.norm.group_channels}

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        # x: (B, 3, H, W) in [-1, 1]
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # z: (B, embed_dim, H/f, W/f), unscaled
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_to_latent(self, x: torch.Tensor, sample: bool = False,
                         generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Image → the scaled latent the diffusion model works on, float32 whatever the weights' dtype: the
        posterior's mean, or with ``sample`` a draw from it (draw_latent; one generator per sample or the global
        RNG)."""
        posterior = self.encode(x.to(self.quant_conv.weight.dtype))
        z = draw_latent(posterior.mean, posterior.std, generators) if sample else posterior.mean.float()
        return z * self.scale_factor

    def decode_from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent → image in [-1, 1] (not clamped), float32 whatever the weights' dtype (a bf16 or fp16
        autoencoder decodes in its own dtype)."""
        return self.decode((z.float() / self.scale_factor).to(self.post_quant_conv.weight.dtype)).float()
