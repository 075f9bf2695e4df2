"""Token correspondences between a source and a target prompt, for Prompt-to-Prompt's cross-attention edits.

An edit gives the target prompt's cross-attention map at each target position n as Σ_w base[w]·M[w, n], a
mix of the source's maps through a mapper M (L_src × L_tgt), and a per-target-position α (1 = take the
mapped source map, 0 = keep the target's own map). Positions follow the long-prompt layout: 77·n positions,
chunk c = [BOS] content [EOS] pad…, chunks the prompt does not fill hold the empty chunk.

- Replace (word swap): equal word counts; equal words map token to token; a swapped word maps each of its
  source tokens to each of its target tokens with weight 1/len(target tokens) (one-to-one if the counts match).
- Refine: Needleman–Wunsch global alignment of the two token sequences (gap 0, match 1, mismatch −1); a
  target token without a source token gets α = 0.

Structure outside the prompt's tokens maps to itself: BOS of chunk c to BOS of chunk c, and the k-th
non-content position of chunk c (EOS, then padding) to the k-th of the source's chunk c (or its last one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

GAP = 0
MATCH = 1
MISMATCH = -1

# Traceback moves, tried in this order on ties (as in the Prompt-to-Prompt reference): a gap in the source
# (target token unmatched), a gap in the target (source token dropped), then the diagonal pair.
_LEFT, _UP, _DIAG = 1, 2, 3


def global_alignment(
    source: list[int], target: list[int], gap: int = GAP, match: int = MATCH, mismatch: int = MISMATCH
) -> list[int]:
    """Needleman–Wunsch alignment; returns for each target item the index of its source item, or −1."""
    n, m = len(source), len(target)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]
    for j in range(1, m + 1):
        score[0][j], move[0][j] = j * gap, _LEFT
    for i in range(1, n + 1):
        score[i][0], move[i][0] = i * gap, _UP
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left = score[i][j - 1] + gap
            up = score[i - 1][j] + gap
            diag = score[i - 1][j - 1] + (match if source[i - 1] == target[j - 1] else mismatch)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = _LEFT if best == left else _UP if best == up else _DIAG
    aligned = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if move[i][j] == _DIAG:
            i, j = i - 1, j - 1
            aligned[j] = i
        elif move[i][j] == _LEFT:
            j -= 1
        else:
            i -= 1
    return aligned


@dataclass
class PromptLayout:
    """Where a prompt's tokens sit in its 77·n context positions."""

    content_ids: list[int]  # token ids of the prompt, no BOS/EOS
    content_positions: list[int]  # context position of each content token
    bos_positions: list[int]  # per chunk
    rest_positions: list[list[int]]  # per chunk: EOS and padding, in order
    length: int  # 77·n

    @classmethod
    def of(cls, conditioner: torch.nn.Module, prompt: str, num_chunks: int) -> PromptLayout:
        tokens, mask, _ = conditioner.tokenize_chunks([prompt])  # (1, n_p, 77) each
        tokens, mask = tokens[0], mask[0]
        chunk_length = tokens.shape[-1]
        if tokens.shape[0] > num_chunks:
            raise ValueError(f"prompt {prompt!r} takes {tokens.shape[0]} chunks, more than {num_chunks}")
        bos, eos = conditioner.bos_id, conditioner.eos_id
        content_ids, content_positions, bos_positions, rest_positions = [], [], [], []
        for c in range(num_chunks):
            base = c * chunk_length
            bos_positions.append(base)
            rest: list[int] = []
            for k in range(1, chunk_length):
                real = c < tokens.shape[0] and bool(mask[c, k])
                token = int(tokens[c, k]) if c < tokens.shape[0] else eos
                if real and token != eos and token != bos:
                    content_ids.append(token)
                    content_positions.append(base + k)
                else:
                    rest.append(base + k)
            rest_positions.append(rest)
        return cls(content_ids, content_positions, bos_positions, rest_positions, num_chunks * chunk_length)


def _structure(source: PromptLayout, target: PromptLayout, mapper: Tensor) -> None:
    """Map BOS to BOS and the non-content positions of each chunk in order (see the module docstring)."""
    for c, (bos_s, bos_t) in enumerate(zip(source.bos_positions, target.bos_positions)):
        mapper[bos_s, bos_t] = 1.0
        rest_s, rest_t = source.rest_positions[c], target.rest_positions[c]
        for k, position in enumerate(rest_t):
            mapper[rest_s[min(k, len(rest_s) - 1)], position] = 1.0


def _word_spans(conditioner: torch.nn.Module, prompt: str, layout: PromptLayout) -> list[tuple[str, list[int]]]:
    """(word, context positions of its tokens) for each whitespace-separated word of the prompt."""
    spans, cursor = [], 0
    for word in prompt.split():
        count = len(conditioner.tokenizer.encode(word))
        ids = layout.content_ids[cursor:cursor + count]
        if ids != conditioner.tokenizer.encode(word):
            raise ValueError(f"cannot place the tokens of word {word!r} of {prompt!r} (prompt truncated?)")
        spans.append((word, layout.content_positions[cursor:cursor + count]))
        cursor += count
    return spans


def replacement_mapper(
    conditioner: torch.nn.Module, source: str, target: str, num_chunks: int
) -> tuple[Tensor, Tensor]:
    """Word-swap mapper (L, L) and α (L,) of ones. The prompts must have the same number of words."""
    src_words, tgt_words = source.split(), target.split()
    if len(src_words) != len(tgt_words):
        raise ValueError(
            f"replace edits swap words one for one: {source!r} has {len(src_words)} words, {target!r} has "
            f"{len(tgt_words)}; use edit='refine' for other changes"
        )
    src, tgt = PromptLayout.of(conditioner, source, num_chunks), PromptLayout.of(conditioner, target, num_chunks)
    mapper = torch.zeros(src.length, tgt.length)
    _structure(src, tgt, mapper)
    for (_, src_pos), (_, tgt_pos) in zip(_word_spans(conditioner, source, src), _word_spans(conditioner, target, tgt)):
        if len(src_pos) == len(tgt_pos):
            for s, t in zip(src_pos, tgt_pos):
                mapper[s, t] = 1.0
        else:
            for t in tgt_pos:
                mapper[src_pos, t] = 1.0 / len(tgt_pos)
    return mapper, torch.ones(tgt.length)


def refinement_mapper(
    conditioner: torch.nn.Module, source: str, target: str, num_chunks: int
) -> tuple[Tensor, Tensor]:
    """Alignment mapper (L, L) with one source per aligned target position, and α (L,): 0 for new tokens."""
    src, tgt = PromptLayout.of(conditioner, source, num_chunks), PromptLayout.of(conditioner, target, num_chunks)
    mapper = torch.zeros(src.length, tgt.length)
    alphas = torch.ones(tgt.length)
    _structure(src, tgt, mapper)
    for j, i in enumerate(global_alignment(src.content_ids, tgt.content_ids)):
        t = tgt.content_positions[j]
        if i < 0:
            alphas[t] = 0.0
        else:
            mapper[src.content_positions[i], t] = 1.0
    return mapper, alphas
