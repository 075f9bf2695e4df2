"""The open_clip text tower, cut out of an open_clip model, and the weights it is given.

open_clip builds a whole CLIP (text and image towers, pooling, projections); a text encoder for cross-attention
needs only the per-token features of the text transformer. `load_text_tower` builds the model of an
architecture, keeps those parts (`OpenCLIPTextTower`) and gives them their weights: an open_clip pretrained
tag, a local file (an open_clip checkpoint, a full or text-only state dict, .safetensors or a torch pickle), a
state dict already in memory (converted weights), or none (random weights, for tests).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import open_clip
import torch
from safetensors.torch import load_file
from torch import nn

# A `pretrained` value with one of these endings is a file, never an open_clip tag.
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
# Every open_clip text tower state dict has this key; its prefix locates the tower inside any checkpoint.
_ANCHOR_KEY = "token_embedding.weight"
# How many keys an error message names before it stops.
_MAX_LISTED = 5


class OpenCLIPTextTower(nn.Module):
    """The parts of an open_clip text tower that make per-token features; no pooling, no projection."""

    def __init__(
        self,
        token_embedding: nn.Embedding,
        positional_embedding: nn.Parameter,
        transformer: nn.Module,
        ln_final: nn.Module,
        attn_mask: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.token_embedding = token_embedding
        self.positional_embedding = positional_embedding
        self.transformer = transformer
        self.ln_final = ln_final
        # Causal mask (additive, -inf above the diagonal); None for bidirectional towers. Not persistent:
        # open_clip rebuilds it too, and checkpoints do not carry it.
        self.register_buffer("attn_mask", attn_mask, persistent=False)
        # open_clip 3.x runs its blocks batch-first; older towers are sequence-first.
        self.batch_first = bool(getattr(transformer, "batch_first", False))

    @classmethod
    def from_open_clip(cls, model: nn.Module, arch: str) -> OpenCLIPTextTower:
        # CLIP keeps the text parts at the top level; CustomTextCLIP (and CoCa) keep them in `model.text`.
        source = model.text if isinstance(getattr(model, "text", None), nn.Module) else model
        required = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if not all(hasattr(source, name) for name in required):
            raise ValueError(
                f"open_clip model {arch!r} has a text tower of type {type(source).__name__}; only open_clip's "
                "own TextTransformer layout (token_embedding, positional_embedding, transformer, ln_final) "
                "is supported, not Hugging Face text towers"
            )
        if getattr(source, "cls_emb", None) is not None:
            raise ValueError(f"open_clip model {arch!r} appends a class token to the text (CoCa); not supported")
        return cls(
            source.token_embedding,
            source.positional_embedding,
            source.transformer,
            source.ln_final,
            getattr(source, "attn_mask", None),
        )

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.resblocks)

    def forward(self, tokens: torch.Tensor, num_blocks: int, final_norm: bool) -> torch.Tensor:
        # tokens: (N, L) → features (N, L, d) after the first `num_blocks` residual blocks.
        x = self.token_embedding(tokens) + self.positional_embedding  # (N, L, d)
        if not self.batch_first:
            x = x.transpose(0, 1)  # (L, N, d)
        attn_mask = None if self.attn_mask is None else self.attn_mask.to(x.dtype)
        for block in self.transformer.resblocks[:num_blocks]:
            x = block(x, attn_mask=attn_mask)
        if not self.batch_first:
            x = x.transpose(0, 1)  # (N, L, d)
        return self.ln_final(x) if final_norm else x


def is_weights_file(pretrained: str) -> bool:
    """Whether a `pretrained` string names a local file (an existing path, a path, or a weights suffix)
    rather than an open_clip tag such as "laion2b_s32b_b79k"."""
    return os.path.isfile(pretrained) or os.sep in pretrained or pretrained.endswith(_FILE_SUFFIXES)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or torch weights file, unwrapped from {"state_dict": ...}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text encoder weights not found: {path}")
    if path.endswith(".safetensors"):
        state = load_file(path)
    else:
        # weights_only: a checkpoint must never be able to run code on load.
        state = torch.load(path, map_location="cpu", weights_only=True)
    # open_clip training checkpoints (and Lightning ones) wrap the weights in {"state_dict": ...}.
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def text_tower_state(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Finds the text tower inside a full-model, text-only or wrapped state dict and strips its prefix.

    Accepts open_clip CLIP ("token_embedding.weight"), CustomTextCLIP ("text.token_embedding.weight"),
    DDP ("module."), this encoder's own state dict and anything else with a single text tower in it.
    """
    prefixes = [key[: -len(_ANCHOR_KEY)] for key in state if key.endswith(_ANCHOR_KEY)]
    if len(prefixes) != 1:
        raise ValueError(
            f"{path}: expected exactly one text tower (a key ending in {_ANCHOR_KEY!r}), found {len(prefixes)}"
        )
    prefix = prefixes[0]
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def _check_tower_state(state: Mapping[str, torch.Tensor], tower: OpenCLIPTextTower, what: str) -> None:
    """Raises ValueError naming the keys when a tower state dict does not fit the tower key for key."""
    expected = {key: value.shape for key, value in tower.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(
        f"{key}: expected {tuple(shape)}, got {tuple(state[key].shape)}"
        for key, shape in expected.items()
        if key in state and state[key].shape != shape
    )
    problems = [
        f"{len(keys)} {kind} keys {keys[:_MAX_LISTED]}{' …' if len(keys) > _MAX_LISTED else ''}"
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
        if keys
    ]
    if problems:
        raise ValueError(f"{what}: the text tower weights do not fit: " + "; ".join(problems))


def load_text_tower(arch: str, pretrained: str | Mapping[str, torch.Tensor] | None) -> OpenCLIPTextTower:
    """The text tower of open_clip architecture `arch`, with weights from `pretrained`.

    pretrained: an open_clip tag (downloaded by open_clip), a weights file (see `is_weights_file`), a state
        dict of this tower (the keys of `OpenCLIPTextTower.state_dict()`, checked key for key) or None for
        random weights. Raises FileNotFoundError for a missing file and ValueError for weights that do not fit.
    """
    in_memory = isinstance(pretrained, Mapping)
    from_file = isinstance(pretrained, str) and is_weights_file(pretrained)
    tag = pretrained if isinstance(pretrained, str) and not from_file else None
    model = open_clip.create_model(arch, pretrained=tag)
    # Keep only the text tower: the vision tower (most of ViT-H-14's weights) is dropped with `model`.
    tower = OpenCLIPTextTower.from_open_clip(model, arch)
    del model
    if from_file:
        state = text_tower_state(read_state_dict(pretrained), pretrained)
        wanted = tower.state_dict().keys()
        missing = sorted(k for k in wanted if k not in state)
        if missing:
            raise ValueError(f"{pretrained}: text tower weights missing for {arch!r}: {missing[:5]} …")
        tower.load_state_dict({k: state[k] for k in wanted}, strict=True)
    elif in_memory:
        _check_tower_state(pretrained, tower, f"text encoder {arch!r}")
        tower.load_state_dict(dict(pretrained), strict=True)
    return tower


__all__ = ["OpenCLIPTextTower", "is_weights_file", "load_text_tower", "read_state_dict", "text_tower_state"]
