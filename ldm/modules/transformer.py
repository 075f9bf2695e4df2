"""The spatial transformer: self-attention, then cross-attention on the context, then a GEGLU feed-forward.

Module and parameter names follow the latent-diffusion code (``attn1``, ``attn2``, ``ff``, ``norm1..3``,
``proj_in``, ``proj_out``) so that Stable Diffusion checkpoints map onto it key for key.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import attention

# An attention controller sees the probabilities of a layer (B, heads, Lq, Lk) and may return edited ones.
# It is how attention maps are recorded and how Prompt-to-Prompt and Attend-and-Excite act on them.
AttentionController = Callable[[torch.Tensor, "Attention"], torch.Tensor]


class Attention(nn.Module):
    """Multi-head attention of queries from ``x`` over keys/values from ``context`` (self-attention if None)."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
        backend: str = "auto",
        fuse_projections: bool = True,
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.is_cross = context_dim is not None
        self.backend = backend
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        # Set by the editing tools; None on the normal path, where this costs one attribute check.
        self.controller: AttentionController | None = None
        self.name = ""  # filled in by the U-Net with the module path, for controllers to key on
        # One GEMM against the concatenated projection weights instead of one per projection (see _fusable).
        self.fuse_projections = fuse_projections
        # Keys and values of the last context, reused while the context stays the same object: set to a dict
        # by UNetModel.cache_context() around a sampling loop, where every step sees the same text.
        self.context_cache: dict[str, torch.Tensor] | None = None

    def _fusable(self, *projections: nn.Module) -> bool:
        # Only bare nn.Linear layers are fused: an adapter (LoRA replaces the layer with a wrapper) or a hook
        # must see its own call. The weights stay separate parameters (to_q, to_k, to_v: the checkpoint keys).
        return self.fuse_projections and all(
            type(p) is nn.Linear and not p._forward_hooks and not p._forward_pre_hooks for p in projections
        )

    def _project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._fusable(self.to_q, self.to_k, self.to_v):
            return self.to_q(x), self.to_k(x), self.to_v(x)
        # Concatenating the weights costs 3·inner·dim copies per call, little next to the (B·L)·dim·3·inner GEMM.
        weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])  # (3·inner, dim)
        q, k, v = F.linear(x, weight).chunk(3, dim=-1)  # views of one (B, L, 3·inner) tensor
        return q, k, v

    def _project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.context_cache
        use_cache = cache is not None and not torch.is_grad_enabled()
        if use_cache and cache.get("context") is context:
            return cache["k"], cache["v"]
        if self._fusable(self.to_k, self.to_v):
            k, v = F.linear(context, torch.cat([self.to_k.weight, self.to_v.weight])).chunk(2, dim=-1)
        else:
            k, v = self.to_k(context), self.to_v(context)
        if use_cache:
            cache.update(context=context, k=k, v=v)
        return k, v

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: (B, Lq, query_dim); context: (B, Lk, context_dim); mask: (B, Lk) bool
        if context is None:
            q, k, v = self._project_qkv(x)
        else:
            q = self.to_q(x)
            k, v = self._project_kv(context)
        if self.controller is None:
            out = attention(q, k, v, self.heads, mask=mask, backend=self.backend)
        else:
            _, probs = attention(q, k, v, self.heads, mask=mask, return_probs=True)
            probs = self.controller(probs, self)  # (B, heads, Lq, Lk)
            b, lk = v.shape[:2]
            v = v.view(b, lk, self.heads, -1).transpose(1, 2)
            out = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).reshape(b, -1, self.heads * self.head_dim)
        return self.to_out(out)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one projection to 2·inner, half of it gates the other half."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GatedGELU.apply(self.proj(x))


class _GatedGELU(torch.autograd.Function):
    """h · gelu(gate) for [h, gate] = projected, storing only ``projected`` for backward.

    Autograd on the plain expression also keeps gelu(gate), a third tensor of the feed-forward's widest
    size; recomputing it in backward costs one GELU and saves that memory in every transformer block.
    """

    @staticmethod
    def forward(ctx, projected: torch.Tensor) -> torch.Tensor:
        h, gate = projected.chunk(2, dim=-1)  # (..., inner) each
        ctx.save_for_backward(projected)
        return h * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (projected,) = ctx.saved_tensors
        h, gate = projected.chunk(2, dim=-1)
        grad_h = grad * F.gelu(gate)
        grad_gate = torch.ops.aten.gelu_backward(grad * h, gate)
        return torch.cat([grad_h, grad_gate], dim=-1)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """norm → self-attention → norm → cross-attention on the context → norm → feed-forward, each residual."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0, backend: str = "auto"
    ):
        super().__init__()
        self.attn1 = Attention(dim, heads, head_dim, None, dropout, backend)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, dropout, backend)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """Runs transformer blocks over the pixels of a feature map, one token per pixel.

    ``use_linear`` picks the projection in and out of the token space: a 1×1 conv (SD1) applied before
    flattening, or a linear layer (SD2) applied after. Both compute the same map; only the weight layout and
    the point of the reshape differ.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        depth: int = 1,
        dropout: float = 0.0,
        use_linear: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim, dropout, backend) for _ in range(depth)
        )
        proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)
        # Zero-init so each transformer starts as the identity (the residual alone) and training
        # begins from the plain convolutional U-Net.
        nn.init.zeros_(proj_out.weight)
        nn.init.zeros_(proj_out.bias)
        self.proj_out = proj_out

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        # The blocks run on contiguous tokens: every residual add and LayerNorm inside then reads memory in order
        # (a transposed view would be copied again by each of them).
        if self.use_linear or _plain_conv(self.proj_in):
            x = _pointwise(self.proj_in, x.flatten(2).transpose(1, 2))  # (B, H*W, inner), one copy in the GEMM
        else:
            x = self.proj_in(x).flatten(2).transpose(1, 2).contiguous()
        for block in self.transformer_blocks:
            x = block(x, context, mask)
        if self.use_linear or _plain_conv(self.proj_out):
            # (B, H*W, C) viewed as (B, C, H, W): the residual add below does the transposing copy.
            return residual + _pointwise(self.proj_out, x).transpose(1, 2).view(b, c, h, w)
        return self.proj_out(x.transpose(1, 2).reshape(b, -1, h, w)) + residual


def _plain_conv(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d and not module._forward_hooks and not module._forward_pre_hooks


def _pointwise(projection: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution (SD1's proj_in/proj_out) applied to tokens (B, L, C) as the linear map it is; a linear
    layer (SD2) as itself. Same weights and keys; the token form skips two layout changes around the conv."""
    if isinstance(projection, nn.Conv2d):
        return F.linear(tokens, projection.weight.flatten(1), projection.bias)
    return projection(tokens)
