"""The open_clip text encoder as a trainable part: for fine-tuning it with the U-Net (DreamBooth's
``train_text_encoder``) or with adapters in it (LoRA on the text encoder).

The same tower, tokenisation and long-prompt layout as FrozenOpenCLIPTextEncoder; what changes is what a
trainable part needs: gradients flow through the encoding, nothing is cached (the encodings change with every
step), ``.train()`` is honoured, and ``frozen = False`` puts its weights in the optimizer and in checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.conditioning.text import FrozenOpenCLIPTextEncoder

TARGET = "ldm.conditioning.trainable_text.TrainableOpenCLIPTextEncoder"


class TrainableOpenCLIPTextEncoder(FrozenOpenCLIPTextEncoder):
    frozen: bool = False

    def __init__(self, **kwargs) -> None:
        kwargs["cache_size"] = 0  # a cached encoding would be stale after the next optimizer step
        super().__init__(**kwargs)
        self.requires_grad_(True)

    def train(self, mode: bool = True) -> "TrainableOpenCLIPTextEncoder":
        return nn.Module.train(self, mode)

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens (N, 77) → (N, 77, d), with autograd (the parent runs this under no_grad).
        return self.text(tokens.to(self.device), self.num_blocks, self.final_norm)

    def empty_chunk(self) -> torch.Tensor:
        # Recomputed every time (the parent keeps it): the weights change between calls.
        self._empty_chunk = None
        return super().empty_chunk()
