"""Prompt-to-Prompt image editing by cross-attention control (Hertz et al. 2022).

The source prompt and the edited (target) prompt are sampled together from the same z_T. While the early
steps lay out the image, the target's attention is taken from the source's:

- cross-attention (every layer): target = α_t·edit(source, target) + (1 − α_t)·target, with α_t = 1 for steps
  ⌊b₀·(N+1)⌋ ≤ i < ⌊b₁·(N+1)⌋ of `cross_replace_steps` (a float b means (0, b); a dict may give words of
  the target prompt their own window, with "default_" for the rest);
- self-attention (layers with ≤ 16² queries): target = source for ⌊N·s₀⌋ ≤ i < ⌊N·s₁⌋ (`self_replace_steps`).

Edits: "replace" (word swap, token mapper), "refine" (aligned tokens; new tokens keep their own attention),
"reweight" (the source's maps, aligned to the target, times `edit_weight` at `edit_words`; no
renormalisation). The 16² bound is absolute, as in the reference: on a model whose largest grid is 8×8 every
self-attention layer qualifies. Optional LocalBlend keeps the target's change inside the region that
attends to `blend_words` and copies the source elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.editing.attention_maps import CrossAttentionStore, token_indices
from ldm.editing.controllers import (
    AttentionController,
    ControllerChain,
    default_attention_grid,
    select_layers,
    use_controller,
)
from ldm.editing.seq_aligner import refinement_mapper, replacement_mapper
from ldm.modules.transformer import Attention

if TYPE_CHECKING:
    from ldm.pipeline import GenerationResult, LatentDiffusionPipeline

log = logging.getLogger(__name__)

EDITS = ("replace", "refine", "reweight")
# (cross_replace_steps, self_replace_steps) of the reference notebook.
DEFAULT_REPLACE_STEPS = {"replace": (0.8, 0.4), "reweight": (0.8, 0.4), "refine": (0.5, 0.2)}
SELF_REPLACE_MAX_QUERIES = 16**2
BLEND_THRESHOLD = 0.3

Window = float | tuple[float, float]


def _window(value: Window) -> tuple[float, float]:
    start, end = (0.0, float(value)) if isinstance(value, (int, float)) else (float(value[0]), float(value[1]))
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"a replace window must satisfy 0 <= start <= end <= 1, got {value}")
    return start, end


def cross_replace_alphas(
    num_steps: int,
    length: int,
    cross_replace_steps: Window | Mapping[str, Window],
    word_positions: Mapping[str, list[int]] | None = None,
) -> Tensor:
    """α (num_steps + 1, length): 1 where step i replaces the target's cross-attention at that position."""
    if isinstance(cross_replace_steps, Mapping):
        windows = dict(cross_replace_steps)
        default = windows.pop("default_", 1.0)
    else:
        windows, default = {}, cross_replace_steps
    alphas = torch.zeros(num_steps + 1, length)

    def fill(window: Window, positions: slice | list[int]) -> None:
        start, end = _window(window)
        alphas[:, positions] = 0.0
        alphas[int(start * (num_steps + 1)) : int(end * (num_steps + 1)), positions] = 1.0

    fill(default, slice(None))
    for word, window in windows.items():
        fill(window, list((word_positions or {})[word]))
    return alphas


class PromptToPromptController(AttentionController):
    """Edits the target row's attention from the source row's; the conditional rows are [source, target].

    mapper (L, L) and token_alphas (L,) from `seq_aligner`; cross_alphas (N + 1, L); equalizer (L,) or None.
    """

    def __init__(
        self,
        mapper: Tensor,
        token_alphas: Tensor,
        cross_alphas: Tensor,
        self_steps: tuple[int, int],
        equalizer: Tensor | None = None,
        self_max_queries: int = SELF_REPLACE_MAX_QUERIES,
    ):
        super().__init__(num_prompts=2)
        self.mapper = mapper
        self.token_alphas = token_alphas
        self.cross_alphas = cross_alphas
        self.self_steps = self_steps
        self.equalizer = equalizer
        self.self_max_queries = self_max_queries

    def edit_cross(self, base: Tensor, target: Tensor) -> Tensor:
        """base, target: (heads, Lq, Lk) → the edited target, before mixing with α_t."""
        lk = base.shape[-1]
        mapper = self.mapper[:lk, :lk].to(base)
        token_alphas = self.token_alphas[:lk].to(base)
        # Σ_w base[w]·M[w, n]: a 0/1 column copies a source map exactly, so identical prompts change nothing.
        mapped = torch.matmul(base, mapper)  # (heads, Lq, Lk)
        edited = mapped * token_alphas + target * (1 - token_alphas)
        if self.equalizer is not None:
            edited = edited * self.equalizer[:lk].to(base)
        return edited

    def __call__(self, probs: Tensor, attn: Attention) -> Tensor:
        # probs: (B, heads, Lq, Lk), conditional rows [source, target]
        rows = self.conditional_rows(probs.shape[0])
        base, target = probs[rows.start], probs[rows.start + 1]  # (heads, Lq, Lk) each
        if attn.is_cross:
            if probs.shape[-1] > self.mapper.shape[0]:
                raise ValueError(
                    f"context of {probs.shape[-1]} tokens is longer than the mapper's {self.mapper.shape[0]}"
                )
            alpha = self.cross_alphas[min(self.step, self.cross_alphas.shape[0] - 1), : probs.shape[-1]]
            if not bool(alpha.any()):
                return probs
            alpha = alpha.to(probs)
            new_target = self.edit_cross(base, target) * alpha + target * (1 - alpha)
        else:
            start, end = self.self_steps
            if probs.shape[2] > self.self_max_queries or not start <= self.step < end:
                return probs
            new_target = base
        out = probs.clone()
        out[rows.start + 1] = new_target
        return out


class LocalBlend:
    """Sampler callback: z_t ← z_t[source] + mask·(z_t − z_t[source]) (the reference's LocalBlend).

    The mask is where the blend words' cross-attention (summed over their tokens, averaged over heads, layers
    and the steps so far) is above `threshold` of its maximum, after a 3×3 max-pool and a nearest resize to
    the latent, for the source's words or the target's.
    """

    def __init__(self, store: CrossAttentionStore, positions: tuple[list[int], list[int]], threshold: float):
        self.store = store
        self.positions = positions
        self.threshold = threshold

    def mask(self, latent_hw: tuple[int, int]) -> Tensor:
        maps = self.store.maps()  # (2, h, w, Lk)
        word_maps = torch.stack([maps[p][..., idx].sum(-1) for p, idx in enumerate(self.positions)])  # (2, h, w)
        word_maps = F.max_pool2d(word_maps[:, None], kernel_size=3, stride=1, padding=1)  # (2, 1, h, w)
        word_maps = F.interpolate(word_maps, size=latent_hw, mode="nearest")
        peak = word_maps.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(word_maps.dtype).tiny)
        selected = (word_maps / peak) > self.threshold  # (2, 1, H, W)
        return (selected[0] | selected[1]).float()[None]  # (1, 1, H, W)

    def __call__(self, info: dict[str, Any]) -> Tensor:
        x = info["x"]  # (2, C, H, W): [source, target]
        mask = self.mask(tuple(x.shape[-2:])).to(x)
        return x[:1] + mask * (x - x[:1])


def _blend_positions(
    conditioner: torch.nn.Module, prompts: tuple[str, str], blend_words: Sequence[Any]
) -> tuple[list[int], list[int]]:
    """Positions of the blend words in each prompt: a pair (source words, target words), or one list looked
    up in both prompts (a word may be missing from one of them)."""
    if len(blend_words) == 2 and all(isinstance(w, (list, tuple)) for w in blend_words):
        source_words, target_words = blend_words
        return token_indices(conditioner, prompts[0], list(source_words)), token_indices(
            conditioner, prompts[1], list(target_words)
        )
    found: tuple[list[int], list[int]] = ([], [])
    for word in blend_words:
        hits = 0
        for k, prompt in enumerate(prompts):
            try:
                found[k].extend(token_indices(conditioner, prompt, [word]))
                hits += 1
            except ValueError:
                pass
        if not hits:
            raise ValueError(f"blend word {word!r} is in neither prompt")
    return found


def prompt_to_prompt(
    pipe: LatentDiffusionPipeline,
    source_prompt: str,
    target_prompt: str | None = None,
    *,
    edit: str = "replace",
    cross_replace_steps: Window | Mapping[str, Window] | None = None,
    self_replace_steps: Window | None = None,
    edit_words: Sequence[str | int] | None = None,
    edit_weight: float = 1.0,
    blend_words: Sequence[Any] | None = None,
    blend_threshold: float = BLEND_THRESHOLD,
    self_replace_max_queries: int = SELF_REPLACE_MAX_QUERIES,
    steps: int | None = None,
    negative_prompt: str | list[str] = "",
    **generate_kwargs,
) -> GenerationResult:
    """Generate the source image and its edit from the same seed. Returns a GenerationResult with images
    [source, edited] and prompts [source_prompt, target_prompt]. target_prompt: the edited prompt; for
    "reweight" it defaults to the source prompt (reweighting its own words).

    cross_replace_steps / self_replace_steps: None = the edit's default (replace, reweight: 0.8 / 0.4;
        refine: 0.5 / 0.2).
    edit_words, edit_weight: for "reweight", words (or positions) of the target prompt whose attention is
        multiplied by edit_weight. When the prompts differ, the source's maps are first aligned as in refine.
    blend_words: LocalBlend words; None = no blending.
    generate_kwargs: those of `LatentDiffusionPipeline.generate` except n (seed, sampler, cfg_scale, ...).
    """
    if edit not in EDITS:
        raise ValueError(f"unknown edit {edit!r}; choose one of {EDITS}")
    if target_prompt is None:
        if edit != "reweight":
            raise ValueError(f"edit={edit} needs target_prompt (the edited prompt)")
        target_prompt = source_prompt  # reweighting words of the prompt itself
    if generate_kwargs.pop("n", 1) != 1:
        raise ValueError("prompt_to_prompt makes one source/edit pair; call it per seed")
    default_cross, default_self = DEFAULT_REPLACE_STEPS[edit]
    cross_replace_steps = default_cross if cross_replace_steps is None else cross_replace_steps
    self_start, self_end = _window(default_self if self_replace_steps is None else self_replace_steps)
    steps = int(pipe.option(steps, "steps", 50))
    conditioner = pipe.conditioner

    # Long prompts: the mapper covers the most chunks any encoded prompt can take (the sampler's context may
    # be shorter, e.g. without guidance, and then uses its top-left block).
    chunk_length = conditioner.chunk_length
    negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
    num_chunks = max(conditioner.num_chunks(p) for p in [source_prompt, target_prompt, *negatives])
    if edit == "replace":
        mapper, token_alphas = replacement_mapper(conditioner, source_prompt, target_prompt, num_chunks)
    elif edit == "refine" or source_prompt != target_prompt:
        mapper, token_alphas = refinement_mapper(conditioner, source_prompt, target_prompt, num_chunks)
    else:
        length = num_chunks * chunk_length
        mapper, token_alphas = torch.eye(length), torch.ones(length)

    equalizer = None
    if edit == "reweight":
        if not edit_words:
            raise ValueError("edit='reweight' needs edit_words (words or positions of the target prompt)")
        equalizer = torch.ones(mapper.shape[1])
        equalizer[token_indices(conditioner, target_prompt, list(edit_words))] = float(edit_weight)

    word_positions = None
    if isinstance(cross_replace_steps, Mapping):
        word_positions = {
            w: token_indices(conditioner, target_prompt, [w]) for w in cross_replace_steps if w != "default_"
        }
    cross_alphas = cross_replace_alphas(steps, mapper.shape[1], cross_replace_steps, word_positions)
    controller: AttentionController = PromptToPromptController(
        mapper,
        token_alphas,
        cross_alphas,
        (int(steps * self_start), int(steps * self_end)),
        equalizer,
        self_replace_max_queries,
    )

    size = int(generate_kwargs.get("image_size") or pipe.image_size)
    latent = size // pipe.autoencoder.downsampling_factor
    # Every cross-attention layer, and the self-attention layers small enough to be replaced.
    layers = select_layers(pipe.unet, (latent, latent), cross=True) + select_layers(
        pipe.unet, (latent, latent), cross=False, max_queries=self_replace_max_queries
    )
    callback = generate_kwargs.pop("callback", None)
    if blend_words:
        grid = default_attention_grid(pipe.unet, (latent, latent))
        # Chained before the editor, so the blend mask reads the unedited maps (as the reference does).
        store = CrossAttentionStore(grid, num_prompts=2)
        positions = _blend_positions(conditioner, (source_prompt, target_prompt), list(blend_words))
        blend = LocalBlend(store, positions, blend_threshold)
        controller = ControllerChain(store, controller)
        user_callback = callback

        def callback(info: dict[str, Any]) -> Tensor:
            x = blend(info)
            if user_callback is not None:
                replaced = user_callback({**info, "x": x})
                x = x if replaced is None else replaced
            return x

    log.info(
        "prompt-to-prompt %s: %r → %r, cross window %s, self steps [%d, %d) of %d",
        edit, source_prompt, target_prompt, cross_replace_steps, int(steps * self_start), int(steps * self_end), steps,
    )
    with use_controller(pipe.unet, controller, layers):
        return pipe.generate(
            [source_prompt, target_prompt],
            shared_noise=True,
            steps=steps,
            negative_prompt=negative_prompt,
            callback=callback,
            **generate_kwargs,
        )
