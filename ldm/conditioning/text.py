"""Frozen open_clip text encoder: captions → per-token context for the U-Net's cross-attention.

Long prompts use the A1111 layout (algorithms spec §3). A prompt is tokenized without special tokens and cut
into chunks of 75 tokens; every chunk becomes one 77-token sequence

    [BOS] t_1 … t_k [EOS] pad … pad        (k ≤ 75, pad = EOS or 0, 77 tokens in all)

that goes through the text transformer on its own. The chunk encodings are concatenated along the sequence
axis, so a prompt of n chunks gives a context of 77·n tokens. In a batch, prompts with fewer chunks are padded
with the encoding of an empty chunk (the chunk of ""), and those padding chunks are masked out.

Mask convention (shared by every conditioner in `ldm.conditioning`): bool, True = the U-Net may attend to
this context token. In a real chunk, BOS, the prompt's tokens and the EOS are True and the padding after the
EOS is False; batch-padding chunks are False throughout. With `use_mask=False` the mask is all True, which
is what the original SD models saw during training (they attend to the padding too).

The encoder is deterministic and frozen, so encodings can be cached per caption (`cache_size`). With the cache
on, each caption is encoded on its own, so a cached encoding is exactly what the encoder gives for it whenever
asked (batched with other captions it would differ by float rounding, ~1e-6: matrix products of another shape).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Mapping

import open_clip
import torch
from torch import nn

from ldm.conditioning.open_clip_tower import is_weights_file, load_text_tower

logger = logging.getLogger(__name__)

LAYERS = ("last", "penultimate")
PAD_TOKENS = ("eos", "zero")


def shorten(text: str, width: int = 120) -> str:
    """``text`` cut in the middle to about ``width`` characters, saying how much was left out: a log line quotes
    a prompt or caption, never all 10,000 characters of one."""
    if len(text) <= width:
        return text
    half = width // 2
    return f"{text[:half]} […{len(text) - 2 * half} characters…] {text[-half:]}"


class FrozenOpenCLIPTextEncoder(nn.Module):
    """Frozen open_clip text tower mapping prompts to (context (B, 77·n, d), mask (B, 77·n)).

    Args:
        arch: open_clip architecture name (SD2 uses "ViT-H-14", d = 1024).
        pretrained: an open_clip pretrained tag, a local file (open_clip checkpoint, full or text-only state
            dict, .safetensors or torch pickle), the text tower's state dict in memory (converted weights; see
            `ldm.conditioning.open_clip_tower`) or None for random weights (tests only).
        layer: "last" or "penultimate" transformer block output (SD2 uses "penultimate").
        final_norm: apply the tower's final LayerNorm (ln_final) to the chosen layer's output. SD2's
            FrozenOpenCLIPEmbedder applies it to the penultimate output too (True); SDXL's second encoder
            feeds the raw penultimate output (False).
        max_chunks: the most 75-token chunks per prompt; longer prompts are truncated with a warning.
        pad_token: what fills a chunk after its EOS: "eos" (A1111) or "zero" (open_clip's tokenizer and SD2).
        use_mask: return the real key-padding mask; False returns all True (what the original SD U-Nets saw).
        cache_size: number of per-caption encodings kept in an LRU cache (0 = off). Exact: the encoder is frozen
            and, with the cache on, encodes each caption on its own (see the module docstring); each entry costs
            77·n·d·4 bytes on the encoder's device.
    """

    # Read by the training module: frozen conditioners get no optimizer entry and stay out of checkpoints.
    frozen: bool = True

    def __init__(
        self,
        arch: str = "ViT-H-14",
        pretrained: str | Mapping[str, torch.Tensor] | None = None,
        layer: str = "penultimate",
        final_norm: bool = True,
        max_chunks: int = 3,
        pad_token: str = "eos",
        use_mask: bool = True,
        cache_size: int = 0,
    ) -> None:
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        if pad_token not in PAD_TOKENS:
            raise ValueError(f"pad_token must be one of {PAD_TOKENS}, got {pad_token!r}")
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.arch = arch
        self.layer = layer
        self.final_norm = final_norm
        self.max_chunks = max_chunks
        self.pad_token = pad_token
        self.use_mask = use_mask
        self.cache_size = cache_size

        self.text = load_text_tower(arch, pretrained)
        if isinstance(pretrained, str) and is_weights_file(pretrained):
            logger.info("text encoder %s: weights loaded from %s", arch, pretrained)
        elif pretrained is None:
            logger.warning(
                "text encoder %s has RANDOM weights (pretrained=None): captions carry no meaning; "
                "set pretrained to an open_clip tag or a weights file for real training",
                arch,
            )
        self.num_blocks = self.text.num_blocks - (1 if layer == "penultimate" else 0)

        tokenizer = open_clip.get_tokenizer(arch)
        if not all(hasattr(tokenizer, a) for a in ("sot_token_id", "eot_token_id", "encode", "decode")):
            raise ValueError(f"open_clip model {arch!r} uses {type(tokenizer).__name__}; only the CLIP BPE "
                             "tokenizer (SimpleTokenizer) is supported")
        self.tokenizer = tokenizer
        self.bos_id: int = tokenizer.sot_token_id
        self.eos_id: int = tokenizer.eot_token_id
        self.pad_id: int = self.eos_id if pad_token == "eos" else 0
        self.chunk_length: int = self.text.context_length  # 77: BOS + 75 tokens + EOS
        self.tokens_per_chunk: int = self.chunk_length  # context tokens per chunk (Conditioner protocol)
        self.chunk_capacity: int = self.chunk_length - 2  # 75 prompt tokens per chunk

        # prompt → (context (77·n, d), mask (77·n)), most recently used last. Cleared whenever the weights,
        # device or dtype change (see _apply and _load_from_state_dict).
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._empty_chunk: torch.Tensor | None = None  # (77, d) encoding of the chunk of ""

        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ frozen module plumbing

    def train(self, mode: bool = True) -> "FrozenOpenCLIPTextEncoder":
        # Frozen: a parent's .train() must not switch this tower to training behaviour (dropout), because the
        # U-Net is trained against the encodings of this exact, deterministic function.
        return super().train(False)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 (torch's own signature)
        # .to(device/dtype) changes what an encoding is: drop cached tensors rather than return stale ones.
        self.clear_cache()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # noqa: ANN001 (torch's own signature)
        self.clear_cache()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def clear_cache(self) -> None:
        """Forgets every cached encoding; called whenever what an encoding is may have changed."""
        self._cache = OrderedDict()
        self._empty_chunk = None

    @property
    def output_dim(self) -> int:
        """Context width d (1024 for ViT-H-14)."""
        return self.text.width

    @property
    def device(self) -> torch.device:
        return self.text.token_embedding.weight.device

    # ------------------------------------------------------------------ tokenization

    def _prompt_tokens(self, prompt: str) -> tuple[list[list[int]], str]:
        """Splits a prompt into chunks of at most 75 token ids; returns (chunks, dropped text)."""
        ids = self.tokenizer.encode(prompt)  # no BOS/EOS
        limit = self.max_chunks * self.chunk_capacity
        dropped = ""
        if len(ids) > limit:
            dropped = self.tokenizer.decode(ids[limit:]).strip()
            logger.warning("prompt of %d tokens truncated to %d (max_chunks=%d): %r; dropped text: %r", len(ids),
                           limit, self.max_chunks, shorten(prompt), shorten(dropped))
            ids = ids[:limit]
        # The empty prompt is one chunk with no tokens (BOS, EOS, padding).
        chunks = [ids[i:i + self.chunk_capacity] for i in range(0, len(ids), self.chunk_capacity)] or [[]]
        return chunks, dropped

    def _chunk_row(self, ids: list[int]) -> tuple[list[int], list[bool]]:
        # [BOS] ids [EOS] pad…  → 77 token ids and the attend mask (True up to and including the EOS).
        row = [self.bos_id, *ids, self.eos_id]
        n_pad = self.chunk_length - len(row)
        return row + [self.pad_id] * n_pad, [True] * len(row) + [False] * n_pad

    def num_chunks(self, prompt: str) -> int:
        """Chunks the prompt takes after truncation to max_chunks: max(1, ceil(tokens / 75))."""
        n_ids = len(self.tokenizer.encode(prompt))
        return min(self.max_chunks, max(1, math.ceil(n_ids / self.chunk_capacity)))

    def tokenize_chunks(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Token ids of every chunk, batch-padded to the longest prompt with empty chunks.

        Returns:
            tokens: (B, n, 77) long; batch-padding chunks hold the empty chunk's ids.
            mask: (B, n, 77) bool, the layout mask (independent of use_mask): True for BOS, tokens and EOS
                of real chunks; False for the padding after EOS and for whole batch-padding chunks.
            dropped: per prompt, the text cut off by truncation ("" when nothing was cut).
        """
        split = [self._prompt_tokens(p) for p in prompts]
        n = max(len(chunks) for chunks, _ in split)
        empty_row, _ = self._chunk_row([])
        tokens = torch.tensor([empty_row], dtype=torch.long).repeat(len(prompts), n, 1)  # (B, n, 77)
        mask = torch.zeros(len(prompts), n, self.chunk_length, dtype=torch.bool)  # (B, n, 77)
        for b, (chunks, _) in enumerate(split):
            for c, ids in enumerate(chunks):
                row, row_mask = self._chunk_row(ids)
                tokens[b, c] = torch.tensor(row)
                mask[b, c] = torch.tensor(row_mask)
        return tokens, mask, [dropped for _, dropped in split]

    def token_strings(self, prompt: str) -> list[str]:
        """Label of each of the prompt's 77·n context positions, e.g. for attention-map plots.

        BOS and EOS are "<start_of_text>" / "<end_of_text>", padding after EOS is "<pad>", and every other
        position is its decoded BPE token without surrounding whitespace.
        """
        tokens, mask, _ = self.tokenize_chunks([prompt])
        labels = []
        for token_id, attend in zip(tokens.flatten().tolist(), mask.flatten().tolist()):
            if not attend:
                labels.append("<pad>")
            elif token_id == self.bos_id:
                labels.append("<start_of_text>")
            elif token_id == self.eos_id:
                labels.append("<end_of_text>")
            else:
                labels.append(self.tokenizer.decode([token_id]).strip())
        return labels

    # ------------------------------------------------------------------ encoding

    @torch.no_grad()
    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens (N, 77) → (N, 77, d). No autograd graph: the tower is frozen and its inputs are integers.
        return self.text(tokens.to(self.device), self.num_blocks, self.final_norm)

    def empty_chunk(self) -> torch.Tensor:
        """(77, d) encoding of the chunk of "" (BOS, EOS, padding); fills missing chunks."""
        if self._empty_chunk is None:
            row, _ = self._chunk_row([])
            self._empty_chunk = self._encode_tokens(torch.tensor([row]))[0]
        return self._empty_chunk

    def _encode_unique(self, prompts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Encodes distinct prompts, all their chunks in one forward: prompt → (ctx (77·n, d), mask (77·n))."""
        tokens, mask, _ = self.tokenize_chunks(prompts)  # (P, n, 77) each
        real = mask.any(dim=-1)  # (P, n): chunk belongs to the prompt (every real chunk attends to its BOS)
        encoded = self._encode_tokens(tokens[real])  # (R, 77, d), R = number of real chunks
        per_prompt = encoded.split(real.sum(dim=1).tolist())  # P tensors (n_i, 77, d)
        mask = mask.to(self.device)
        return {
            prompt: (ctx.flatten(0, 1), mask[i, : ctx.shape[0]].flatten())
            for i, (prompt, ctx) in enumerate(zip(prompts, per_prompt))
        }

    def _lookup(self, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-prompt encodings, from the cache where possible; each prompt string is encoded once."""
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for prompt in prompts:
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                found[prompt] = self._cache[prompt]
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        if missing:
            if self.cache_size > 0:
                # One prompt per forward: matrix products of another batch size round differently (~1e-6), so a
                # cached encoding would depend on which captions first shared its batch, and a resumed run (its
                # cache empty) would compute what the uninterrupted run had cached slightly differently. Alone,
                # a prompt's encoding is the same whenever it is made. The cost is paid once per caption.
                new = {p: value for prompt in missing for p, value in self._encode_unique([prompt]).items()}
            else:
                new = self._encode_unique(missing)
            found.update(new)
            if self.cache_size > 0:
                for prompt, value in new.items():
                    self._cache[prompt] = value
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return [found[p] for p in prompts]

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts → context (B, 77·n, d) float and mask (B, 77·n) bool (True = attend), n = most chunks."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        encodings = self._lookup(list(prompts))
        n = max(ctx.shape[0] for ctx, _ in encodings) // self.chunk_length
        contexts, masks = [], []
        for ctx, mask in encodings:
            ctx, mask = self.pad_to_chunks(ctx[None], mask[None], n)  # (1, 77·n, d), (1, 77·n)
            contexts.append(ctx)
            masks.append(mask)
        context, mask = torch.cat(contexts), torch.cat(masks)  # (B, 77·n, d), (B, 77·n)
        if not self.use_mask:
            mask = torch.ones_like(mask)
        return context, mask

    def encode_empty(self, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional context for classifier-free guidance: the encoding of "" (not zeros).

        Returns context (batch_size, 77, d) and mask (batch_size, 77) (BOS and EOS True).
        """
        return self([""] * batch_size)

    def pad_to_chunks(self, context: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pads an encoding with empty chunks to n chunks, e.g. a negative prompt to its prompt's length.

        context (B, 77·m, d), mask (B, 77·m) → (B, 77·n, d), (B, 77·n); the added chunks are masked
        (mask False) unless use_mask is False.
        """
        m, rest = divmod(context.shape[1], self.chunk_length)
        if rest:
            raise ValueError(f"context length {context.shape[1]} is not a multiple of {self.chunk_length}")
        if m > n:
            raise ValueError(f"encoding has {m} chunks, more than the requested {n}")
        if m == n:
            return context, mask
        batch = context.shape[0]
        filler = self.empty_chunk().to(context.dtype).repeat(n - m, 1)  # (77·(n-m), d)
        filler = filler.expand(batch, -1, -1)  # (B, 77·(n-m), d)
        filler_mask = torch.full((batch, filler.shape[1]), not self.use_mask, dtype=torch.bool, device=mask.device)
        return torch.cat([context, filler.to(context.device)], dim=1), torch.cat([mask, filler_mask], dim=1)

    def extra_repr(self) -> str:
        return (f"arch={self.arch!r}, layer={self.layer!r}, final_norm={self.final_norm}, "
                f"max_chunks={self.max_chunks}, pad_token={self.pad_token!r}, use_mask={self.use_mask}, "
                f"cache_size={self.cache_size}")
