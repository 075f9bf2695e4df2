"""Class-label conditioner: integer labels → a one-token context for the U-Net's cross-attention.

It returns the same (context, mask) pair as the text encoder, so the U-Net never needs to know what made its
context (text, class labels, or any other embedding such as fMRI features).
"""

from __future__ import annotations

import torch
from torch import nn


class ClassLabelEncoder(nn.Module):
    """Learned embedding per class plus one "null" class for the unconditional branch of guidance.

    Unlike the text encoder this module is TRAINABLE: its table is learnt with the U-Net, so it belongs in the
    optimizer and in checkpoints (`frozen = False`).

    Inputs are ints, strings of ints ("3") or a LongTensor. The null class has index `num_classes`; the empty
    string "" also maps to it, so the caption dropout that replaces captions with "" for classifier-free
    guidance works unchanged when the "captions" are class labels.

    Args:
        num_classes: number of real classes (labels 0 … num_classes − 1).
        dim: context width d, the U-Net's context_dim.
    """

    frozen: bool = False
    tokens_per_chunk: int = 1  # one context token per label
    # A label context is one token and never padded, so its mask is exact (all True) whatever this says.
    use_mask: bool = True

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes}, {dim}")
        self.num_classes = num_classes
        self.null_class = num_classes
        # Default N(0, 1) init: unit-scale features per channel, like the LayerNorm-ed CLIP context the
        # cross-attention layers are otherwise fed.
        self.embedding = nn.Embedding(num_classes + 1, dim)

    @property
    def output_dim(self) -> int:
        return self.embedding.embedding_dim

    def _to_indices(self, labels: list[int | str] | torch.Tensor) -> torch.Tensor:
        if isinstance(labels, torch.Tensor):
            indices = labels.long().flatten()
        else:
            indices = torch.tensor(
                [self.null_class if (isinstance(x, str) and x.strip() == "") else int(x) for x in labels],
                dtype=torch.long,
            )
        if indices.numel() and (indices.min() < 0 or indices.max() > self.null_class):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} = null)")
        return indices.to(self.embedding.weight.device)

    def forward(self, labels: list[int | str] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """labels (B,) → context (B, 1, d) and mask (B, 1), all True."""
        indices = self._to_indices(labels)  # (B,)
        context = self.embedding(indices)[:, None]  # (B, 1, d)
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)  # (B, 1)
        return context, mask

    def encode_empty(self, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Unconditional context: the null-class embedding, (batch_size, 1, d) and mask (batch_size, 1)."""
        return self(torch.full((batch_size,), self.null_class, dtype=torch.long))

    def clear_cache(self) -> None:
        """Nothing to forget: the table is read on every call."""

    def pad_to_chunks(self, context: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Class contexts are always one chunk of one token; only n == 1 is meaningful."""
        if n != 1 or context.shape[1] != 1:
            raise ValueError(f"class-label contexts have exactly one chunk, asked for {n}")
        return context, mask
