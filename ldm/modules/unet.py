"""The time-conditioned U-Net with cross-attention transformer blocks (Rombach et al. 2022, §3.3).

    x_t (B, C, H, W), t (B,), context (B, L, d), mask (B, L)
      → conv_in → input_blocks (ResBlock [+ SpatialTransformer]) × num_res_blocks, Downsample between levels
      → middle_block (ResBlock, SpatialTransformer, ResBlock)
      → output_blocks (ResBlock on [h, skip] [+ SpatialTransformer]) × (num_res_blocks + 1), Upsample between
      → GroupNorm, SiLU, conv_out → prediction (B, C_out, H, W)

Module names (``time_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``, ``out``, and inside a
ResBlock ``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``) are those of the latent-diffusion
code, so Stable Diffusion checkpoints load key for key. The network knows nothing of noise schedules or of
what produced the context: text, class labels or any other embedding sequence.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.modules.embeddings import TimestepEmbedding
from ldm.modules.transformer import Attention, SpatialTransformer


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-5)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected timestep embedding, then GroupNorm-SiLU-dropout-conv, residual."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        # The last conv starts at zero so a fresh block is the identity through its skip path.
        self.out_layers = nn.Sequential(
            _norm(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """A U-Net block: passes each layer what it needs (the embedding to ResBlocks, the context to transformers)."""

    def forward(self, x, emb, context, mask):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        num_heads: int | None = 8,
        head_dim: int | None = None,
        transformer_depth: int = 1,
        context_dim: int = 768,
        use_linear_projection: bool = False,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        attention_backend: str = "auto",
        fuse_attention_projections: bool = True,
        trim_masked_context: bool = True,
    ):
        """
        attention_resolutions: downsampling factors (1 = full latent resolution) at which blocks get a
            transformer; SD uses (4, 2, 1).
        num_heads / head_dim: set exactly one. ``num_heads`` fixes the count of heads at every level (SD1:
            8); ``head_dim`` fixes the channels per head and lets the count grow with width (SD2: 64).
        use_linear_projection: transformer proj_in/proj_out as linear layers (SD2) instead of 1×1 convs (SD1).
        fuse_attention_projections: compute q, k, v (self-attention) and k, v (cross-attention) with one GEMM
            each; the weights and their checkpoint keys stay separate.
        trim_masked_context: drop the context positions after the last one any sample attends to (the padding
            of short prompts) before cross-attention; the output is the same, the work is smaller.
        """
        super().__init__()
        if (num_heads is None) == (head_dim is None):
            raise ValueError(
                f"set exactly one of num_heads (heads per layer) and head_dim (channels per head); "
                f"got num_heads={num_heads}, head_dim={head_dim}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.context_dim = context_dim
        self.gradient_checkpointing = gradient_checkpointing
        self.trim_masked_context = trim_masked_context
        self._context_cache_on = False
        self._cached_context: torch.Tensor | None = None
        self.num_levels = len(channel_mult)
        emb_dim = model_channels * 4
        self.time_embed = TimestepEmbedding(model_channels, emb_dim)

        def transformer(ch: int) -> SpatialTransformer:
            heads, dim = (num_heads, ch // num_heads) if num_heads is not None else (ch // head_dim, head_dim)
            return SpatialTransformer(
                ch, heads, dim, context_dim, transformer_depth, dropout, use_linear_projection, attention_backend
            )

        self.input_blocks = nn.ModuleList(
            [TimestepSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * model_channels, dropout)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepSequential(
            ResBlock(ch, emb_dim, ch, dropout), transformer(ch), ResBlock(ch, emb_dim, ch, dropout)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * model_channels, dropout)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(nn.Conv2d(model_channels, out_channels, 3, padding=1)))

        for name, module in self.named_modules():
            if isinstance(module, Attention):
                module.name = name
                module.fuse_projections = fuse_attention_projections

    @property
    def downsampling_factor(self) -> int:
        """Input sizes must be divisible by this."""
        return 2 ** (self.num_levels - 1)

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def set_attention_backend(self, backend: str) -> None:
        for layer in self.attention_layers():
            layer.backend = backend

    @contextmanager
    def cache_context(self) -> Iterator[UNetModel]:
        """Compute the cross-attention keys and values of a context once and reuse them in later calls.

        A sampling loop runs the U-Net on the same text at every step, and the keys and values of that text
        (a (B, L, context_dim) projection in every cross-attention layer) do not depend on the step. Inside this
        block a call whose context equals the previous call's (one comparison per call) reuses them. Calls with
        autograd on are not cached; the weights must not change inside the block.
        """
        layers = [layer for layer in self.attention_layers() if layer.is_cross]
        for layer in layers:
            layer.context_cache = {}
        self._context_cache_on = True
        try:
            yield self
        finally:
            self._context_cache_on = False
            self._cached_context = None
            for layer in layers:
                layer.context_cache = None

    def _same_context(self, context: torch.Tensor) -> torch.Tensor:
        """The cached context object if ``context`` equals it (the layers key their caches on identity)."""
        if not self._context_cache_on or torch.is_grad_enabled():
            return context
        cached = self._cached_context
        if (
            cached is not None
            and cached.shape == context.shape
            and cached.dtype == context.dtype
            and cached.device == context.device
            and torch.equal(cached, context)
        ):
            return cached
        self._cached_context = context
        return context

    def _trim_padding(
        self, context: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cut the context after the last position that any sample attends to.

        Masked keys get exactly zero attention weight, so dropping the padding of short prompts (most of the 77
        positions of a CLIP context) changes nothing but the cost of cross-attention's keys, values and scores.
        Left alone when a sample attends to nothing (its weights would be spread over whatever remains) and while
        an attention controller is set (the editing tools index all context positions).
        """
        if mask is None or not self.trim_masked_context:
            return context, mask
        if any(layer.controller is not None for layer in self.attention_layers()):
            return context, mask
        length = mask.shape[1]
        positions = torch.arange(1, length + 1, device=mask.device)
        last = (mask.to(positions.dtype) * positions).amax(dim=1)  # (B,) 1-based last attended position, 0: none
        keep = int(torch.where((last > 0).all(), last.amax(), length))  # one host sync per call
        if keep == length:
            return context, mask
        return context[:, :keep], mask[:, :keep]

    def _run(self, block: TimestepSequential, h, emb, context, mask):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Recompute the block's activations in backward instead of storing them: memory for compute.
            return checkpoint(block, h, emb, context, mask, use_reentrant=False)
        return block(h, emb, context, mask)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x: (B, C, H, W); t: (B,) or scalar; context: (B, L, context_dim); context_mask: (B, L) bool
        if context is None:
            raise ValueError("UNetModel needs a context (B, L, context_dim); pass the conditioner's output")
        if context.shape[-1] != self.context_dim:
            raise ValueError(f"context has width {context.shape[-1]} but the U-Net was built for {self.context_dim}")
        f = self.downsampling_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be divisible by {f} for this U-Net")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(t)  # (B, 4·model_channels)
        context, context_mask = self._trim_padding(context.to(x.dtype), context_mask)
        context = self._same_context(context)

        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, context_mask)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb, context, context_mask)
        return self.out(h)
