"""Attention controllers: how editing code sees (and changes) the attention probabilities of a U-Net.

Every `Attention` layer has a `controller` slot. While a controller is installed (`use_controller`), each
layer computes its probabilities on the math path and calls `controller(probs, layer)` with
probs (B, heads, Lq, Lk), using what it returns. With none installed the layer's fast path runs untouched.

Batch layout. With classifier-free guidance the sampler's model_fn runs [uncond₁…uncond_P, cond₁…cond_P] as
one batch of 2P; without guidance it runs P rows. Editing acts on the P conditional rows only, so every
controller knows P (`num_prompts`) and asks `conditional_rows`.

Steps. The controller counts U-Net forward passes through a forward pre-hook: `step` is the index of the
pass in progress. Every sampler here calls the network once per step, so `step` is the sampler's step index.

The editing tools sample with `LatentDiffusionPipeline.generate(..., shared_noise=True)`: one batch in which every
prompt starts from the same seeded noise (Prompt-to-Prompt needs the source and the edit to share z_T), with its
hooks for changing z_t after (``callback``) or before (``before_step``, Attend-and-Excite's latent update) a step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ldm.modules.transformer import Attention
from ldm.modules.unet import Downsample, UNetModel, Upsample

log = logging.getLogger(__name__)

class AttentionController:
    """Base controller: passes probabilities through and keeps the step counter and the latent size."""

    def __init__(self, num_prompts: int = 1):
        self.num_prompts = num_prompts
        self.step = -1  # index of the U-Net forward in progress
        self.num_forwards = 0
        self.latent_hw: tuple[int, int] | None = None

    def begin_forward(self, x: Tensor) -> None:
        """Called by the U-Net's forward pre-hook with its input x (B, C, H, W)."""
        self.step = self.num_forwards
        self.num_forwards += 1
        self.latent_hw = (int(x.shape[-2]), int(x.shape[-1]))

    def conditional_rows(self, batch: int) -> slice:
        """Rows of a (batch, ...) attention tensor that belong to the conditional prompts."""
        p = self.num_prompts
        if batch == 2 * p:
            return slice(p, 2 * p)  # [uncond, cond]: classifier-free guidance
        if batch == p:
            return slice(0, p)  # conditional forward only (guidance off, or Attend-and-Excite's pass)
        raise ValueError(f"attention batch of {batch} rows fits neither {p} prompts nor their guided batch {2 * p}")

    def __call__(self, probs: Tensor, attn: Attention) -> Tensor:
        # probs: (B, heads, Lq, Lk)
        return probs


class ControllerChain(AttentionController):
    """Runs controllers in order; each sees what the previous one returned (e.g. record, then edit)."""

    def __init__(self, *controllers: AttentionController):
        super().__init__(controllers[0].num_prompts if controllers else 1)
        self.controllers = list(controllers)

    def begin_forward(self, x: Tensor) -> None:
        super().begin_forward(x)
        for controller in self.controllers:
            controller.begin_forward(x)

    def __call__(self, probs: Tensor, attn: Attention) -> Tensor:
        for controller in self.controllers:
            probs = controller(probs, attn)
        return probs


@contextmanager
def use_controller(
    unet: UNetModel, controller: AttentionController, layers: Iterable[Attention] | None = None
) -> Iterator[AttentionController]:
    """Install `controller` on `layers` (default: every attention layer of `unet`) for the block.

    Only these layers take the math path and call the controller; the others keep their fast backend, which
    matters for memory: a 64×64 self-attention layer's probabilities are 4096² per head. The layers' previous
    controllers come back on exit and the step-counting pre-hook is removed, so a U-Net leaves the block
    exactly as fast as it entered it.
    """
    layers = unet.attention_layers() if layers is None else list(layers)
    previous = [layer.controller for layer in layers]

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        controller.begin_forward(args[0] if args else kwargs["x"])

    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    for layer in layers:
        layer.controller = controller
    try:
        yield controller
    finally:
        handle.remove()
        for layer, before in zip(layers, previous):
            layer.controller = before


# ---------------------------------------------------------------------------------------------- layer geometry


def attention_layer_strides(unet: UNetModel) -> dict[str, tuple[int, str]]:
    """Module path of every attention layer → (downsampling stride of its feature map, "down" | "mid" | "up").

    Read from the block structure: a Downsample doubles the stride for the blocks after it; in an output
    block the transformer runs before the block's Upsample.
    """
    strides: dict[str, tuple[int, str]] = {}
    stride = 1
    for block in unet.input_blocks:
        for module in block.modules():
            if isinstance(module, Attention):
                strides[module.name] = (stride, "down")
        if any(isinstance(m, Downsample) for m in block):
            stride *= 2
    for module in unet.middle_block.modules():
        if isinstance(module, Attention):
            strides[module.name] = (stride, "mid")
    for block in unet.output_blocks:
        for module in block.modules():
            if isinstance(module, Attention):
                strides[module.name] = (stride, "up")
        if any(isinstance(m, Upsample) for m in block):
            stride //= 2
    return strides


def cross_attention_grids(unet: UNetModel, latent_hw: tuple[int, int]) -> dict[str, tuple[tuple[int, int], str]]:
    """Module path of every cross-attention layer → ((h, w) query grid, U-Net part) for a latent (H, W)."""
    cross = {layer.name for layer in unet.attention_layers() if layer.is_cross}
    height, width = latent_hw
    return {
        name: ((height // stride, width // stride), part)
        for name, (stride, part) in attention_layer_strides(unet).items()
        if name in cross
    }


def select_layers(
    unet: UNetModel,
    latent_hw: tuple[int, int],
    *,
    cross: bool | None = None,
    grid: tuple[int, int] | None = None,
    max_queries: int | None = None,
) -> list[Attention]:
    """Attention layers by kind (cross=True/False/None for either), query grid and number of queries."""
    strides = attention_layer_strides(unet)
    height, width = latent_hw
    chosen = []
    for layer in unet.attention_layers():
        stride = strides[layer.name][0]
        layer_grid = (height // stride, width // stride)
        if cross is not None and layer.is_cross != cross:
            continue
        if grid is not None and layer_grid != tuple(grid):
            continue
        if max_queries is not None and layer_grid[0] * layer_grid[1] > max_queries:
            continue
        chosen.append(layer)
    return chosen


def default_attention_grid(unet: UNetModel, latent_hw: tuple[int, int], max_side: int = 16) -> tuple[int, int]:
    """The query grid that attention maps and Attend-and-Excite read by default.

    The largest grid with sides ≤ max_side among the cross-attention layers of the down and up paths (the mid
    block is left out, as in Attend-and-Excite: at SD's 512 px this is the 16×16 level, and at 256 px too).
    When every such grid is larger (big images), the smallest one; the mid block only if nothing else has
    cross-attention. A small model whose largest grid is 8×8 reads its 8×8 layers.
    """
    grids = cross_attention_grids(unet, latent_hw)
    if not grids:
        raise ValueError("the U-Net has no cross-attention layers")
    outer = sorted({grid for grid, part in grids.values() if part != "mid"}, key=lambda g: g[0] * g[1])
    if not outer:
        return next(iter(grids.values()))[0]
    small = [g for g in outer if max(g) <= max_side]
    return small[-1] if small else outer[0]
