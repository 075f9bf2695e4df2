"""Exponential moving average of a model's weights, kept as a frozen copy of the model."""

from __future__ import annotations

import copy

import torch
from torch import nn

# Wrappers that FSDP and activation checkpointing put around submodules add these to parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class EMA(nn.Module):
    """θ_ema ← d·θ_ema + (1 − d)·θ, applied every ``update_every`` optimizer steps from ``start_step`` on.

    With ``warmup`` the decay ramps as min(decay, (1 + n) / (10 + n)) over the n updates made so far, so that a
    short run does not end with an average dominated by its random initialisation. The copy is a submodule,
    so it lives in the state dict and every checkpoint carries it.
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.9999, start_step: int = 0, update_every: int = 1, warmup: bool = True
    ):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = decay
        self.start_step = start_step
        self.update_every = max(1, update_every)
        self.warmup = warmup
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True):
        return super().train(False)  # the average is only ever evaluated

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> bool:
        """Fold ``model``'s weights in if ``step`` (the optimizer step just taken) is due. Returns whether it was."""
        if step < self.start_step or (step - self.start_step) % self.update_every:
            return False
        # Before start_step the average just tracks the model, so it starts from the trained weights.
        d = 0.0 if int(self.num_updates) == 0 else self.current_decay()
        ema_params = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            ema = ema_params[clean_name(name)]
            ema.lerp_(p.detach().to(ema.dtype), 1.0 - d)
        ema_buffers = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[clean_name(name)].copy_(b)
        self.num_updates += 1
        return True
