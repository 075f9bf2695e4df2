"""The gradient norm and its clipping, the same for both training stages under every precision and strategy.

Lightning's own clipping refuses any optimizer that can unscale fp16 gradients inside its step (torch's fused
AdamW, the default here), even under bf16-mixed where nothing is scaled, so `trainer=gpu` stopped at its first
step. Both LightningModules call `clip_and_measure` from `configure_gradient_clipping` instead:

1. Under 16-mixed, a GradScaler scales the loss. Lightning unscales the gradients before clipping only for
   optimizers that do not do it themselves; for the others (fused AdamW) this does it, so that the norm, the
   clipping and the finiteness check see the true gradients. GradScaler then hands the fused step no scale (the
   gradients are unscaled already) and still skips the step when it found inf.
2. The total 2-norm over every parameter the optimizer holds (under FSDP over all shards) is computed once: it
   is what gets logged, clipped to, and checked.
3. A non-finite norm drops the update: the gradients are set to None, and torch's optimizers leave parameters
   without a gradient alone. GradScaler does the same for fp16; under bf16 and fp32 nothing else would, and
   clipping by an infinite norm multiplies every gradient by 0 or NaN, so one overflow would turn every weight
   into NaN. Such steps are counted by the divergence guard (ldm.training.divergence).
"""

from __future__ import annotations

import math

import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from torch.distributed.fsdp import FullyShardedDataParallel


def fsdp_root(trainer) -> FullyShardedDataParallel | None:
    """The FSDP-wrapped model under trainer=fsdp, else None."""
    model = getattr(trainer.strategy, "model", None) if trainer is not None else None
    return model if isinstance(model, FullyShardedDataParallel) else None


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def clip_and_measure(trainer, optimizer: torch.optim.Optimizer, clip_val: float | None,
                     algorithm: str | None = "norm") -> torch.Tensor:
    """Unscale (if needed), measure, clip (if ``clip_val``) and drop non-finite gradients; returns the norm."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and _optimizer_handles_unscaling(optimizer):
        scaler.unscale_(optimizer)  # Lightning did it already for the other optimizers
    algorithm = "norm" if algorithm is None else str(algorithm)
    if algorithm not in ("norm", "value"):
        raise ValueError(f"trainer.gradient_clip_algorithm must be 'norm' or 'value', got {algorithm!r}")
    params = optimizer_parameters(optimizer)
    fsdp = fsdp_root(trainer)
    if fsdp is not None:
        if algorithm != "norm" and clip_val:
            raise ValueError(f"trainer=fsdp clips gradients by norm only, got {algorithm!r}")
        # The norm over all shards: torch.nn.utils would see this rank's shard only. inf measures without clipping.
        norm = fsdp.clip_grad_norm_(clip_val if clip_val else math.inf)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        finite = bool(torch.isfinite(norm))
        if clip_val and finite:
            if algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, clip_val)
            else:
                torch.nn.utils.clip_grads_with_norm_(params, clip_val, norm)
    if not bool(torch.isfinite(norm)):
        for p in params:
            p.grad = None
    return norm
