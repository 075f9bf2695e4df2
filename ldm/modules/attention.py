"""The one attention dispatch point: xformers | sdpa | math.

Every attention layer in the framework calls :func:`attention`. The backend is decided here and nowhere
else, so that a benchmark, a test or a user can switch all layers at once, and so that the math path (the
only one that can hand back the attention probabilities) is a reference every fast path is tested against.

Tensors enter and leave with heads merged, ``(B, L, heads * head_dim)``; the split into heads happens here
because each backend wants a different layout:

- xformers ``memory_efficient_attention``: ``(B, L, heads, head_dim)``
- torch ``scaled_dot_product_attention`` and math: ``(B, heads, L, head_dim)``

``mask`` is a key padding mask ``(B, Lk)`` of bools, True = attend. Padded text tokens get no weight.
"""

from __future__ import annotations

import logging
import math
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("auto", "xformers", "sdpa", "math")

_default_backend = "auto"


def set_attention_backend(backend: str) -> None:
    """Set the process-wide default backend used by layers configured with ``backend="auto"``."""
    global _default_backend
    _check_backend(backend)
    _default_backend = backend


def get_attention_backend() -> str:
    return _default_backend


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


@lru_cache(maxsize=None)
def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a binary built for another torch
        return False
    return True


@lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    # lru_cache makes this fire once per distinct message for the life of the process.
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    log.warning(message)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Which backend actually runs for tensors on ``device``."""
    _check_backend(backend)
    if backend == "auto":
        backend = _default_backend
    if backend == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if backend == "xformers" and not (device.type == "cuda" and xformers_available()):
        why = "xformers is not installed" if not xformers_available() else f"tensors are on {device.type}, not CUDA"
        _warn_once(f"attention backend 'xformers' requested but {why}; falling back to 'sdpa'")
        return "sdpa"
    return backend


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    return_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Multi-head scaled dot-product attention.

    q: (B, Lq, heads*head_dim); k, v: (B, Lk, heads*head_dim); mask: (B, Lk) bool, True = attend.
    Returns (B, Lq, heads*head_dim), and with ``return_probs`` also the probabilities (B, heads, Lq, Lk),
    which forces the math path.
    """
    if return_probs:
        return math_attention(q, k, v, heads, mask)
    chosen = resolve_backend(backend, q.device)
    if chosen == "xformers":
        return _xformers_attention(q, k, v, heads, mask)
    if chosen == "sdpa":
        return _sdpa_attention(q, k, v, heads, mask)
    return math_attention(q, k, v, heads, mask)[0]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads*head_dim) -> (B, heads, L, head_dim)"""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, head_dim) -> (B, L, heads*head_dim)"""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference path: softmax(q kᵀ / √d) v, returning the output and the probabilities."""
    q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, heads, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    # Softmax in float32: half-precision softmax over 77+ keys loses the small probabilities
    # that attention maps and Attend-and-Excite read.
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    out = torch.matmul(probs, v)  # (B, heads, Lq, head_dim)
    return merge_heads(out), probs


def _sdpa_attention(q, k, v, heads, mask):
    q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Lk) broadcast over heads and queries
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return merge_heads(out)


def _xformers_attention(q, k, v, heads, mask):
    import xformers.ops as xops

    b, lq, _ = q.shape
    lk = k.shape[1]
    q, k, v = (t.view(b, t.shape[1], heads, -1) for t in (q, k, v))  # (B, L, heads, head_dim)
    bias = None
    if mask is not None:
        # xformers wants an additive bias whose last dimension is stored with a stride that is a multiple
        # of 8: allocate a padded buffer and hand over a slice of it.
        padded = (lk + 7) // 8 * 8
        buf = q.new_zeros(b, heads, lq, padded)
        bias = buf[..., :lk]
        bias.masked_fill_(~mask[:, None, None, :], float("-inf"))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias)  # (B, Lq, heads, head_dim)
    return out.reshape(b, lq, -1)
