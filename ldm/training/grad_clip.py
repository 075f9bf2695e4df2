"""Gradient clipping that works with torch's fused AdamW under bf16 autocast.

Lightning's mixed-precision plugin refuses to clip gradients for any optimizer that unscales gradients inside
its own step (torch's fused AdamW among them), even under bf16-mixed, where no loss scaler exists and the
gradients are already final. Without a scaler this clips them directly; with one (16-mixed) clipping would see
scaled gradients, which the fused step unscales only later, so that combination is a config error.
"""

from __future__ import annotations

import lightning as L
import torch


def clip_gradients(module: L.LightningModule, optimizer, value: float | None, algorithm: str | None) -> None:
    if not value:
        return
    scaler = getattr(module.trainer.precision_plugin, "scaler", None)
    fused = bool(getattr(optimizer, "defaults", {}).get("fused"))
    if scaler is None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_(params, value)
        elif algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, value)
        else:
            raise ValueError(f"trainer.gradient_clip_algorithm must be 'norm' or 'value', got {algorithm!r}")
        return
    if fused:
        raise ValueError("trainer.precision=16-mixed scales the loss and torch's fused AdamW unscales the gradients "
                         "inside its step, so they cannot be clipped before it: set model.optimizer.fused=false (or "
                         "~model.optimizer.fused), trainer.gradient_clip_val=null, or trainer.precision=bf16-mixed")
    module.clip_gradients(optimizer, value, algorithm)  # Lightning unscales first, then clips
