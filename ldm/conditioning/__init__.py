"""Conditioners: whatever conditions the U-Net, turned into a context sequence and its attend mask.

Every conditioner follows one interface, so the U-Net and the samplers never look at what produced the
context:

    forward(inputs)               -> context (B, T, d) float, mask (B, T) bool (True = attend)
    encode_empty(batch_size)      -> the unconditional context for classifier-free guidance
    pad_to_chunks(context, mask, n) -> pads a context to n chunks (negative prompt ↔ prompt)
    output_dim                    -> d, the U-Net's context_dim
    tokens_per_chunk              -> T per chunk (77 for text, 1 for class labels)
    frozen                        -> True: no optimizer entry and not saved in checkpoints
"""

from typing import Any, Protocol, runtime_checkable

import torch

from ldm.conditioning.class_label import ClassLabelEncoder
from ldm.conditioning.text import FrozenOpenCLIPTextEncoder


@runtime_checkable
class Conditioner(Protocol):
    frozen: bool
    tokens_per_chunk: int

    @property
    def output_dim(self) -> int: ...

    def __call__(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]: ...

    def encode_empty(self, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]: ...

    def pad_to_chunks(self, context: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]: ...


__all__ = ["ClassLabelEncoder", "Conditioner", "FrozenOpenCLIPTextEncoder"]
