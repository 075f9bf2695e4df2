"""Attend-and-Excite (Chefer et al. 2023): move z_t so that every subject token gets strong cross-attention.

At step i (algorithms spec §4), with gradients on z_t:
1. run the U-Net on the conditional prompt alone and average the cross-attention probabilities of the layers
   with the chosen query grid over heads and layers → A (h, w, L);
2. keep the attended positions except each chunk's BOS (the attention sink) and renormalise:
   A = softmax(100·A) over them;
3. per subject token: reflect-pad, 3×3 Gaussian smoothing (σ = 0.5), max over pixels;
4. loss = max over subjects of max(0, 1 − maxAttn);
5. at threshold steps with loss > 1 − threshold, refine: update and re-evaluate until loss ≤ 1 − threshold
   or max_refinement_steps updates;
6. for i < max_iter_to_alter and loss ≠ 0: z_t ← z_t − α_i·∂loss/∂z_t, α_i = scale_factor·√(linspace(1.0,
   0.5, N)[i]);
7. then the sampler's normal (guided) step on the updated z_t.

The update runs as a `before_step` hook of the sampling loop, on the VP sample z_t every sampler hands its
callback, so it works with DDIM, DDPM, DPM-Solver++ and Euler ancestral alike.

Positions kept for the second softmax: the reference keeps A[:, :, 1:-1] for SD1 (BOS dropped, EOT and
padding kept) and drops EOT and padding for SD2. Here the key-padding mask decides: positions the U-Net can
attend to (BOS excluded) take part, so EOS does and masked padding does not; with use_mask=False every
non-BOS position does, as in SD1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.editing.attention_maps import CrossAttentionStore, token_indices
from ldm.editing.controllers import default_attention_grid, select_layers, use_controller
from ldm.modules.unet import UNetModel

if TYPE_CHECKING:
    from ldm.pipeline import GenerationResult, LatentDiffusionPipeline

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS: dict[int, float] = {0: 0.05, 10: 0.5, 20: 0.8}
# Sharpens the averaged probabilities before the per-token maximum (the reference's second softmax).
ATTENTION_SOFTMAX_SCALE = 100.0


def gaussian_kernel(kernel_size: int = 3, sigma: float = 0.5) -> Tensor:
    """(k, k) normalised kernel, outer product of exp(−((x − μ)/(2σ))²) (the reference's form; σ = 0.5
    gives the 1-D weights [0.212, 0.576, 0.212])."""
    x = torch.arange(kernel_size, dtype=torch.float32)
    one_d = torch.exp(-(((x - (kernel_size - 1) / 2) / (2 * sigma)) ** 2))
    kernel = one_d[:, None] * one_d[None, :]
    return kernel / kernel.sum()


class AttendExcite:
    """The latent update for one prompt. Call as `before_step(i, t, z_t) → z_t` (batch 1)."""

    def __init__(
        self,
        unet: UNetModel,
        context: Tensor,
        context_mask: Tensor | None,
        token_positions: Sequence[int],
        grid: tuple[int, int],
        num_steps: int,
        *,
        chunk_length: int = 77,
        max_iter_to_alter: int = 25,
        thresholds: Mapping[int, float] | None = None,
        scale_factor: float = 20.0,
        scale_range: tuple[float, float] = (1.0, 0.5),
        smooth_attentions: bool = True,
        sigma: float = 0.5,
        kernel_size: int = 3,
        max_refinement_steps: int = 20,
    ):
        # context: (1, L, D); context_mask: (1, L) bool or None
        self.unet = unet
        self.context = context
        self.context_mask = context_mask
        self.grid = grid
        self.max_iter_to_alter = max_iter_to_alter
        self.thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
        self.step_sizes = [scale_factor * math.sqrt(s) for s in np.linspace(*scale_range, num_steps)]
        self.smooth_attentions = smooth_attentions
        self.kernel = gaussian_kernel(kernel_size, sigma)[None, None]  # (1, 1, k, k)
        self.max_refinement_steps = max_refinement_steps
        self.losses: dict[int, float] = {}

        length = context.shape[1]
        attended = torch.ones(length, dtype=torch.bool) if context_mask is None else context_mask[0].cpu()
        self.kept = [p for p in range(length) if bool(attended[p]) and p % chunk_length != 0]
        missing = [p for p in token_positions if p not in self.kept]
        if missing:
            raise ValueError(f"token positions {missing} are BOS or padding; pick the prompt's own tokens")
        # Index of each subject token among the kept positions.
        self.subjects = [self.kept.index(p) for p in token_positions]

    # -- the loss ------------------------------------------------------------------------------------------------

    def max_attention(self, z: Tensor, t: Tensor) -> Tensor:
        """Smoothed maximum attention of each subject token at z (1, C, H, W); (n_subjects,), with graph."""
        store = CrossAttentionStore(self.grid, num_prompts=1, detach=False)
        # Only the layers read take the math path: the others keep their memory-efficient backward.
        layers = select_layers(self.unet, tuple(z.shape[-2:]), cross=True, grid=self.grid)
        if not layers:
            raise ValueError(f"no cross-attention layer has a {self.grid[0]}×{self.grid[1]} query grid")
        with use_controller(self.unet, store, layers):
            self.unet(z, t, context=self.context.to(z.dtype), context_mask=self.context_mask)
        maps = store.maps()[0][..., self.kept]  # (h, w, K)
        maps = (ATTENTION_SOFTMAX_SCALE * maps).softmax(dim=-1)
        subject_maps = maps[..., self.subjects].permute(2, 0, 1)[:, None]  # (S, 1, h, w)
        if self.smooth_attentions:
            pad = self.kernel.shape[-1] // 2
            subject_maps = F.conv2d(F.pad(subject_maps, (pad,) * 4, mode="reflect"), self.kernel.to(subject_maps))
        return subject_maps.flatten(1).amax(dim=1)

    def loss(self, z: Tensor, t: Tensor) -> Tensor:
        """max over subjects of max(0, 1 − smoothed max attention): 0 when every subject is attended."""
        return (1.0 - self.max_attention(z, t)).clamp_min(0.0).max()

    @staticmethod
    def update(z: Tensor, loss: Tensor, step_size: float) -> Tensor:
        """One gradient step on z: z − step_size·∂loss/∂z."""
        (grad,) = torch.autograd.grad(loss, [z])
        return z - step_size * grad

    # -- the procedure ---------------------------------------------------------------------------------------------

    def _refine(self, z: Tensor, t: Tensor, loss: Tensor, target: float, step_size: float) -> tuple[Tensor, Tensor]:
        updates = 0
        while loss.item() > target and updates < self.max_refinement_steps:
            z = self.update(z, loss, step_size).detach().requires_grad_(True)
            loss = self.loss(z, t)
            updates += 1
        log.info("attend-and-excite refinement: %d updates, loss %.4f (target %.4f)", updates, loss.item(), target)
        return z, loss

    def __call__(self, i: int, t: Tensor, z: Tensor) -> Tensor:
        if i >= self.max_iter_to_alter and i not in self.thresholds:
            return z
        step_size = self.step_sizes[min(i, len(self.step_sizes) - 1)]
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            loss = self.loss(z, t)
            if i in self.thresholds and loss.item() > 1.0 - self.thresholds[i]:
                z, loss = self._refine(z, t, loss, 1.0 - self.thresholds[i], step_size)
            self.losses[i] = loss.item()
            if i < self.max_iter_to_alter and self.losses[i] != 0.0:
                z = self.update(z, loss, step_size)
        log.info("attend-and-excite step %d: loss %.4f", i, self.losses[i])
        return z.detach()


def attend_and_excite(
    pipe: LatentDiffusionPipeline,
    prompt: str,
    token_indices_or_words: Sequence[str | int] | str | int,
    *,
    max_iter_to_alter: int = 25,
    thresholds: Mapping[int, float] | None = None,
    scale_factor: float = 20.0,
    scale_range: tuple[float, float] = (1.0, 0.5),
    smooth_attentions: bool = True,
    sigma: float = 0.5,
    kernel_size: int = 3,
    max_refinement_steps: int = 20,
    attention_res: int | tuple[int, int] | None = None,
    steps: int | None = None,
    negative_prompt: str = "",
    cfg_scale: float | None = None,
    **generate_kwargs,
) -> tuple[GenerationResult, list[float]]:
    """Generate one image of `prompt` with Attend-and-Excite on the given subject tokens.

    token_indices_or_words: words of the prompt (every token of each) or context positions (BOS = 0).
    thresholds: {step index: attention to reach}; None = {0: 0.05, 10: 0.5, 20: 0.8}.
    attention_res: query grid side (or (h, w)); None = the largest grid ≤ 16 of the down/up paths (16×16 for
        SD at 512 px; 8×8 on a model with an 8×8 latent).
    generate_kwargs: the rest of `LatentDiffusionPipeline.generate`'s arguments (seed, sampler, ...), n = 1.

    Returns (result, per_step_losses): per_step_losses[i] is the loss at step i after any refinement (the one
    the step's update descends), for steps 0 … the last step where the latent was optimised; NaN for a step
    in between that was skipped.
    """
    if generate_kwargs.pop("n", 1) != 1:
        raise ValueError("attend_and_excite makes one image; call it per seed")
    steps = int(pipe.option(steps, "steps", 50))
    cfg_scale = float(pipe.option(cfg_scale, "cfg_scale", 7.5))
    size = int(generate_kwargs.get("image_size") or pipe.image_size)
    latent = size // pipe.autoencoder.downsampling_factor
    if attention_res is None:
        grid = default_attention_grid(pipe.unet, (latent, latent))
    elif isinstance(attention_res, int):
        grid = (attention_res, attention_res)
    else:
        grid = tuple(attention_res)

    positions = token_indices(pipe.conditioner, prompt, token_indices_or_words)
    # The same (padded) context the sampler's conditional branch gets.
    context, mask, _, _ = pipe.encode_prompts([prompt], [negative_prompt] if cfg_scale != 1.0 else None)
    excite = AttendExcite(
        pipe.unet,
        context,
        mask,
        positions,
        grid,
        steps,
        chunk_length=pipe.conditioner.tokens_per_chunk,
        max_iter_to_alter=max_iter_to_alter,
        thresholds=thresholds,
        scale_factor=scale_factor,
        scale_range=scale_range,
        smooth_attentions=smooth_attentions,
        sigma=sigma,
        kernel_size=kernel_size,
        max_refinement_steps=max_refinement_steps,
    )
    log.info("attend-and-excite on %r, tokens %s, %d×%d attention", prompt, positions, *grid)
    result = pipe.generate(
        [prompt], shared_noise=True, steps=steps, negative_prompt=negative_prompt, cfg_scale=cfg_scale, before_step=excite,
        **generate_kwargs,
    )
    last = max(excite.losses, default=-1)
    losses = [excite.losses.get(i, float("nan")) for i in range(last + 1)]
    return result, losses
