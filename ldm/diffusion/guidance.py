"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper that turns a conditional network into a model_fn.

ε = ε_uncond + s·(ε_cond − ε_uncond). The unconditional branch is the encoding of the empty prompt, or of a
negative prompt; both branches run as one batched forward of [uncond, cond]. The same combination applies to
v-predictions, which are linear in ε for a fixed x_t.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ldm.diffusion.objectives import ModelFn

DEFAULT_CFG_SCALE = 7.5


class ConditionalModel(Protocol):
    def __call__(
        self, x: Tensor, t: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor: ...


def rescale_noise_cfg(eps_cfg: Tensor, eps_cond: Tensor, phi: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, §3.4): pull the std of the guided prediction back to the
    conditional one's, which counters the over-exposure of large guidance scales.

    out = φ·ε_cfg·σ_cond/σ_cfg + (1 − φ)·ε_cfg, with σ the (unbiased) std over all non-batch dimensions.
    """
    dims = list(range(1, eps_cfg.ndim))
    std_cond = eps_cond.std(dim=dims, keepdim=True)  # (B, 1, ..., 1)
    std_cfg = eps_cfg.std(dim=dims, keepdim=True)
    rescaled = eps_cfg * (std_cond / std_cfg)
    return phi * rescaled + (1 - phi) * eps_cfg


def _match_batch(tensor: Tensor, batch: int, name: str) -> Tensor:
    # A single context (one prompt, or the shared empty prompt) serves every sample in the batch.
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"{name} has batch size {tensor.shape[0]}, expected 1 or {batch}")


def _attend_all(context: Tensor) -> Tensor:
    return torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)  # (B, L)


def cfg_model_fn(
    model: ConditionalModel,
    context: Tensor,
    mask: Tensor | None,
    uncond_context: Tensor | None,
    uncond_mask: Tensor | None,
    cfg_scale: float = DEFAULT_CFG_SCALE,
    guidance_rescale: float = 0.0,
) -> ModelFn:
    """A model_fn(x_t, t) for the samplers that applies classifier-free guidance.

    context, uncond_context: (B or 1, L, D) text encodings; mask, uncond_mask: (B or 1, L) bool, True =
    attend, or None (attend everywhere). The two contexts must have the same length L: prompts longer than
    one chunk are padded to equal chunk counts by the text conditioner, not here. With cfg_scale = 1 guidance
    is the identity, so only the conditional forward runs and uncond_context may be None.
    """
    guided = cfg_scale != 1.0
    if guided:
        if uncond_context is None:
            raise ValueError("cfg_scale != 1 needs an unconditional context (the empty or negative prompt)")
        if uncond_context.shape[1] != context.shape[1]:
            raise ValueError(
                f"conditional context has length {context.shape[1]} but unconditional context has length "
                f"{uncond_context.shape[1]}; pad both prompts to the same number of chunks before guidance"
            )
        if uncond_context.shape[2:] != context.shape[2:]:
            raise ValueError(f"context widths differ: {tuple(context.shape[2:])} vs {tuple(uncond_context.shape[2:])}")

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        batch = x_t.shape[0]
        cond = _match_batch(context, batch, "context")
        cond_mask = None if mask is None else _match_batch(mask, batch, "mask")
        if not guided:
            return model(x_t, t, context=cond, context_mask=cond_mask)

        uncond = _match_batch(uncond_context, batch, "uncond_context")
        uncond_m = None if uncond_mask is None else _match_batch(uncond_mask, batch, "uncond_mask")
        if cond_mask is None and uncond_m is None:
            both_mask = None
        else:
            both_mask = torch.cat(
                [
                    _attend_all(uncond) if uncond_m is None else uncond_m,
                    _attend_all(cond) if cond_mask is None else cond_mask,
                ]
            )  # (2B, L)
        out = model(
            torch.cat([x_t, x_t]),  # (2B, ...)
            torch.cat([t, t]),  # (2B,)
            context=torch.cat([uncond, cond]),  # (2B, L, D)
            context_mask=both_mask,
        )
        eps_uncond, eps_cond = out.chunk(2)
        eps = eps_uncond + cfg_scale * (eps_cond - eps_uncond)
        if guidance_rescale > 0:
            eps = rescale_noise_cfg(eps, eps_cond, guidance_rescale)
        return eps

    return model_fn
