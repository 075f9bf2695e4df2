"""Cross-attention maps: which image regions attend to which prompt token (Hertz et al. 2022, Fig. 4).

A map of token k is the probability mass that the queries (pixels) of cross-attention layers put on context
position k, averaged over heads, over the layers of one query grid and over a window of sampling steps. Only
the conditional rows of a guided batch are read. Positions follow the conditioner's long-prompt layout
(77·n positions, each chunk `[BOS] tokens [EOS] pad…`, BOS of the first chunk at 0).
"""

from __future__ import annotations

import logging
from collections.abc import Container, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ldm.editing.controllers import AttentionController, default_attention_grid, select_layers, use_controller
from ldm.modules.transformer import Attention

if TYPE_CHECKING:
    from ldm.pipeline import GenerationResult, LatentDiffusionPipeline

log = logging.getLogger(__name__)

BOS_LABEL = "<start_of_text>"
EOS_LABEL = "<end_of_text>"
PAD_LABEL = "<pad>"


# ---------------------------------------------------------------------------------------------- tokens


def _normalise(text: str) -> str:
    # CLIP's tokenizer lower-cases and splits on whitespace; compare words the same way.
    return "".join(text.lower().split())


def token_indices(conditioner: torch.nn.Module, prompt: str, words: Sequence[str | int] | str | int) -> list[int]:
    """Context positions of `words` in `prompt` (BOS = 0), in the order given.

    A word (or phrase) matches every run of consecutive token labels whose concatenation spells it, so a word
    split into several BPE tokens gives all of them, and a word that occurs twice gives both occurrences.
    Integers are taken as positions and checked against the prompt's length.
    """
    labels = conditioner.token_strings(prompt)
    if isinstance(words, (str, int)):
        words = [words]
    positions: list[int] = []
    for word in words:
        if isinstance(word, int):
            if not 0 <= word < len(labels):
                raise ValueError(f"token index {word} is outside the prompt's {len(labels)} positions")
            positions.append(word)
            continue
        found = _find_word(labels, _normalise(word))
        if not found:
            content = [label for label in labels if label not in (BOS_LABEL, EOS_LABEL, PAD_LABEL)]
            raise ValueError(f"word {word!r} is not in the prompt {prompt!r}; its tokens are {content}")
        positions.extend(found)
    return positions


def _find_word(labels: list[str], target: str) -> list[int]:
    special = (BOS_LABEL, EOS_LABEL, PAD_LABEL)
    found: list[int] = []
    start = 0
    while start < len(labels):
        spelled, end = "", start
        while end < len(labels) and labels[end] not in special and target.startswith(spelled + labels[end].lower()):
            spelled += labels[end].lower()
            end += 1
            if spelled == target:
                break
        if spelled == target and end > start:
            found.extend(range(start, end))
            start = end
        else:
            start += 1
    return found


def content_positions(conditioner: torch.nn.Module, prompt: str) -> list[int]:
    """Positions of the prompt's own tokens: no BOS, EOS or padding."""
    special = (BOS_LABEL, EOS_LABEL, PAD_LABEL)
    return [i for i, label in enumerate(conditioner.token_strings(prompt)) if label not in special]


# ---------------------------------------------------------------------------------------------- recording


class CrossAttentionStore(AttentionController):
    """Averages the conditional rows' cross-attention probabilities of the layers with one query grid.

    grid: (h, w) query grid to read; steps: step indices to record (None = every step); detach: drop the
    autograd graph (keep it for Attend-and-Excite's gradient). `maps()` gives (P, h, w, Lk): the mean over
    heads, layers and recorded steps, so each pixel's values still sum to one over Lk.
    """

    def __init__(
        self, grid: tuple[int, int], num_prompts: int = 1, steps: Container[int] | None = None, detach: bool = True
    ):
        super().__init__(num_prompts)
        self.grid = grid
        self.steps = steps
        self.detach = detach
        self.reset()

    def reset(self) -> None:
        self.total: Tensor | None = None  # (P, Lq, Lk) sum over heads, layers and steps
        self.count = 0  # number of (head, layer, step) maps in the sum

    def __call__(self, probs: Tensor, attn: Attention) -> Tensor:
        # probs: (B, heads, Lq, Lk)
        h, w = self.grid
        if not attn.is_cross or probs.shape[2] != h * w:
            return probs
        if self.steps is not None and self.step not in self.steps:
            return probs
        rows = probs[self.conditional_rows(probs.shape[0])]  # (P, heads, Lq, Lk)
        if self.detach:
            rows = rows.detach()
        summed = rows.float().sum(dim=1)  # (P, Lq, Lk)
        self.total = summed if self.total is None else self.total + summed
        self.count += rows.shape[1]
        return probs

    def maps(self) -> Tensor:
        """(P, h, w, Lk) mean probability maps; raises if nothing was recorded."""
        if self.total is None:
            raise RuntimeError(f"no cross-attention layer with a {self.grid[0]}×{self.grid[1]} query grid ran")
        mean = self.total / self.count  # (P, Lq, Lk)
        return mean.reshape(mean.shape[0], *self.grid, mean.shape[-1])


def step_range(step_window: tuple[float, float] | tuple[int, int] | None, num_steps: int) -> range:
    """Step indices of a window: None = all; floats in [0, 1] = fractions ⌊a·N⌋ ≤ i < ⌊b·N⌋; ints = [a, b)."""
    if step_window is None:
        return range(num_steps)
    start, end = step_window
    if isinstance(start, float) or isinstance(end, float):
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"fractional step_window must satisfy 0 <= start <= end <= 1, got {step_window}")
        start, end = int(start * num_steps), int(end * num_steps)
    window = range(max(0, int(start)), min(num_steps, int(end)))
    if len(window) == 0:
        raise ValueError(f"step_window {step_window} selects no step of {num_steps}")
    return window


def generate_with_attention_maps(
    pipe: LatentDiffusionPipeline,
    prompt: str,
    *,
    resolution: int | tuple[int, int] | None = None,
    step_window: tuple[float, float] | tuple[int, int] | None = None,
    keep: str = "content",
    steps: int | None = None,
    **generate_kwargs,
) -> tuple[GenerationResult, Tensor, list[str]]:
    """Generate one image and the cross-attention map of each prompt token.

    resolution: query grid side (or (h, w)) of the layers to average; None = `default_attention_grid` (the
        largest grid ≤ 16 of the down/up paths: 16×16 for SD at 512 px, 8×8 on a model whose latent is 8×8).
    step_window: steps to average over (see `step_range`); None = all steps.
    keep: "content" returns the prompt's tokens only; "all" every context position (BOS, EOS, padding too:
        then the maps sum to one at each pixel).
    generate_kwargs: those of `LatentDiffusionPipeline.generate` except n (one image: for image i of a
        request pass seed + i, as generate does).

    Returns (result, maps (n_tokens, h, w), token labels).
    """
    if generate_kwargs.pop("n", 1) != 1:
        raise ValueError("generate_with_attention_maps makes one image; call it per seed")
    if keep not in ("content", "all"):
        raise ValueError(f"keep must be 'content' or 'all', got {keep!r}")
    steps = int(pipe.option(steps, "steps", 50))
    size = int(generate_kwargs.get("image_size") or pipe.image_size)
    latent = size // pipe.autoencoder.downsampling_factor
    if resolution is None:
        grid = default_attention_grid(pipe.unet, (latent, latent))
    elif isinstance(resolution, int):
        grid = (resolution, resolution)
    else:
        grid = tuple(resolution)
    store = CrossAttentionStore(grid, num_prompts=1, steps=set(step_range(step_window, steps)))
    layers = select_layers(pipe.unet, (latent, latent), cross=True, grid=grid)
    if not layers:
        raise ValueError(f"no cross-attention layer has a {grid[0]}×{grid[1]} query grid at image size {size}")
    with use_controller(pipe.unet, store, layers):
        result = pipe.generate([prompt], shared_noise=True, steps=steps, **generate_kwargs)
    maps = store.maps()[0].permute(2, 0, 1)  # (Lk, h, w)
    labels = pipe.conditioner.token_strings(prompt)
    # A longer negative prompt pads the context with empty, masked chunks.
    labels += [PAD_LABEL] * (maps.shape[0] - len(labels))
    keep_idx = list(range(len(labels))) if keep == "all" else content_positions(pipe.conditioner, prompt)
    log.info("attention maps of %d tokens at %d×%d, %d layer-head-steps", len(keep_idx), *grid, store.count)
    return result, maps[keep_idx].cpu(), [labels[i] for i in keep_idx]
