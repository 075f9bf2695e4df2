"""Analytic FLOP count of the U-Net, for throughput in FLOP/s and model FLOP utilisation (MFU).

Per image, counting a multiply-add as 2 FLOPs and leaving out normalisations and pointwise ops:

    convolution k×k, C_in → C_out on an H×W output     2 · k² · C_in · C_out · H · W
    linear d_in → d_out on L tokens                      2 · d_in · d_out · L
    attention, L_q queries over L_k keys, width inner    4 · L_q · L_k · inner      (q·kᵀ, then probs·v)

summed over every layer as UNetModel builds it (``unet_forward_flops``). A training step costs 3× the forward
(the backward computes gradients for both the inputs and the weights of each layer), so

    MFU = 3 · forward FLOPs · batch / step time / peak FLOP/s.

`python bench/flops.py` checks the formula against torch's FLOP counter on the math attention path.
"""

from __future__ import annotations

from typing import Any, Sequence

PEAK_TFLOPS_DEFAULT = 790.0  # the dense bf16 tensor-core peak MFU is quoted against on the GPU path


def _conv(k: int, c_in: int, c_out: int, hw: int) -> int:
    return 2 * k * k * c_in * c_out * hw


def _linear(d_in: int, d_out: int, tokens: int) -> int:
    return 2 * d_in * d_out * tokens


def _transformer(ch: int, heads: int, head_dim: int, context_dim: int, depth: int, hw: int, context_len: int,
                 use_linear: bool) -> int:
    inner = heads * head_dim
    flops = 2 * _linear(ch, inner, hw)  # proj_in and proj_out (a 1×1 conv is the same linear map)
    for _ in range(depth):
        flops += 4 * _linear(inner, inner, hw) + 4 * hw * hw * inner  # self-attention: q, k, v, out; scores
        flops += 2 * _linear(inner, inner, hw) + 2 * _linear(context_dim, inner, context_len)  # cross: q, out; k, v
        flops += 4 * hw * context_len * inner
        flops += _linear(inner, 8 * inner, hw) + _linear(4 * inner, inner, hw)  # GEGLU in (2×4·inner), out
    return flops


def _resblock(c_in: int, c_out: int, emb_dim: int, hw: int) -> int:
    flops = _conv(3, c_in, c_out, hw) + _conv(3, c_out, c_out, hw) + _linear(emb_dim, c_out, 1)
    if c_in != c_out:
        flops += _conv(1, c_in, c_out, hw)
    return flops


def unet_forward_flops(kwargs: dict[str, Any], latent_size: int, context_len: int = 77) -> int:
    """FLOPs of one forward of one image through UNetModel(**kwargs) at a latent_size² input."""
    mc = kwargs.get("model_channels", 320)
    mult: Sequence[int] = kwargs.get("channel_mult", (1, 2, 4, 4))
    nrb = kwargs.get("num_res_blocks", 2)
    attn = set(kwargs.get("attention_resolutions", (4, 2, 1)))
    num_heads, head_dim = kwargs.get("num_heads", 8), kwargs.get("head_dim")
    depth = kwargs.get("transformer_depth", 1)
    context_dim = kwargs.get("context_dim", 768)
    use_linear = kwargs.get("use_linear_projection", False)
    c_in, c_out = kwargs.get("in_channels", 4), kwargs.get("out_channels", 4)
    emb = 4 * mc

    def transformer(ch: int, hw: int) -> int:
        heads, dim = (num_heads, ch // num_heads) if num_heads else (ch // head_dim, head_dim)
        return _transformer(ch, heads, dim, context_dim, depth, hw, context_len, use_linear)

    size = latent_size
    flops = _linear(mc, emb, 1) + _linear(emb, emb, 1)  # time embedding MLP
    flops += _conv(3, c_in, mc, size * size)
    skips, ch, ds = [mc], mc, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            flops += _resblock(ch, m * mc, emb, size * size)
            ch = m * mc
            if ds in attn:
                flops += transformer(ch, size * size)
            skips.append(ch)
        if level != len(mult) - 1:
            size //= 2
            flops += _conv(3, ch, ch, size * size)  # stride-2 conv: counted on its output
            skips.append(ch)
            ds *= 2
    flops += 2 * _resblock(ch, ch, emb, size * size) + transformer(ch, size * size)
    for level, m in reversed(list(enumerate(mult))):
        for i in range(nrb + 1):
            flops += _resblock(ch + skips.pop(), m * mc, emb, size * size)
            ch = m * mc
            if ds in attn:
                flops += transformer(ch, size * size)
            if level and i == nrb:
                size *= 2
                flops += _conv(3, ch, ch, size * size)
                ds //= 2
    flops += _conv(3, mc, c_out, size * size)
    return flops


def train_step_flops(kwargs: dict[str, Any], latent_size: int, batch: int, context_len: int = 77) -> int:
    return 3 * batch * unet_forward_flops(kwargs, latent_size, context_len)


def counted_forward_flops(kwargs: dict[str, Any], latent_size: int, context_len: int = 77) -> int:
    """The same forward counted by torch's FlopCounterMode (math attention, so every matmul is visible)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.modules.unet import UNetModel

    with torch.device("meta"):
        model = UNetModel(**kwargs, attention_backend="math")
        x = torch.randn(1, kwargs.get("in_channels", 4), latent_size, latent_size)
        context = torch.randn(1, context_len, kwargs.get("context_dim", 768))
        t = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(x, t, context)
    return counter.get_total_flops()


def main() -> None:
    from common import UNET_CONFIGS, result

    print("| model | latent | analytic GFLOP/forward | torch FlopCounter | difference |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for name, size in (("emoji", 8), ("sd1", 32), ("sd1", 64), ("sd2", 96)):
        analytic = unet_forward_flops(UNET_CONFIGS[name], size)
        counted = counted_forward_flops(UNET_CONFIGS[name], size)
        diff = (analytic - counted) / counted
        worst = max(worst, abs(diff))
        print(f"| {name} | {size}×{size} | {analytic / 1e9:,.1f} | {counted / 1e9:,.1f} | {diff:+.2%} |")
    print()
    result("flops_formula_max_rel_error", worst)


if __name__ == "__main__":
    main()
