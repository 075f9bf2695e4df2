"""Conditioners: whatever conditions the U-Net, turned into a context sequence and its attend mask.

Every conditioner implements the whole `Conditioner` protocol, so the U-Net, the samplers, training and
sampling code read its attributes directly and never look at what produced the context:

    forward(inputs)                 -> context (B, T, d) float, mask (B, T) bool (True = attend)
    encode_empty(batch_size)        -> the unconditional context for classifier-free guidance
    pad_to_chunks(context, mask, n) -> pads a context to n chunks (negative prompt ↔ prompt)
    output_dim                      -> d, the U-Net's context_dim
    tokens_per_chunk                -> T per chunk (77 for text, 1 for class labels)
    frozen                          -> True: no optimizer entry and not saved in checkpoints
    use_mask                        -> False: every position is attended, padding chunks included (the mask
                                       is all True); True: padding is masked out
    clear_cache()                   -> forget cached encodings (after the weights change, e.g. a LoRA scale)
"""

from typing import Any, Protocol, runtime_checkable

import torch

from ldm.conditioning.class_label import ClassLabelEncoder
from ldm.conditioning.text import FrozenOpenCLIPTextEncoder


@runtime_checkable
class Conditioner(Protocol):
    frozen: bool
    tokens_per_chunk: int
    use_mask: bool

    @property
    def output_dim(self) -> int: ...

    def __call__(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]: ...

    def encode_empty(self, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]: ...

    def pad_to_chunks(self, context: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def clear_cache(self) -> None: ...


__all__ = ["ClassLabelEncoder", "Conditioner", "FrozenOpenCLIPTextEncoder"]
