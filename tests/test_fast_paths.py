"""The U-Net's fast paths give the numbers of the plain computation they replace.

fused q/k/v projections ↔ three separate linear layers; the memory-saving GEGLU ↔ autograd on h·gelu(gate);
trimmed context padding ↔ attending over every masked position; cached context keys/values ↔ recomputing them.
"""

import pytest
import torch
import torch.nn.functional as F

from ldm.modules.transformer import GEGLU, _GatedGELU
from ldm.modules.unet import UNetModel

SMALL = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2), num_heads=2,
             context_dim=24)


def _model(**kwargs):
    """A U-Net with non-zero weights everywhere (zero-initialised output layers would hide a wrong path)."""
    model = UNetModel(**{**SMALL, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _pair(**overrides):
    """A U-Net and a copy with the given options changed."""
    a = _model()
    b = UNetModel(**SMALL, **overrides)
    b.load_state_dict(a.state_dict())
    return a, b


def _inputs(batch=3, length=9):
    x, t = torch.randn(batch, 4, 8, 8), torch.tensor([5, 400, 999][:batch])
    context = torch.randn(batch, length, 24)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row, n in enumerate([2, 5, 3][:batch]):
        mask[row, :n] = True  # short prompts: positions n.. are padding
    return x, t, context, mask


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _forward_backward(*models):
    """Each model's output on the same inputs, after a backward pass that fills its gradients."""
    x, t, context, mask = _inputs()
    outs = []
    for model in models:
        out = model(x, t, context, mask)
        out.square().mean().backward()
        outs.append(out)
    return outs


def test_fused_projections_match_separate_layers():
    fused, separate = _pair(fuse_attention_projections=False)
    assert fused.attention_layers()[0].fuse_projections and not separate.attention_layers()[0].fuse_projections
    outs = _forward_backward(fused, separate)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_grads(fused), _grads(separate), atol=1e-5, rtol=1e-4)
    # the checkpoint keys stay those of separate projections
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in fused.state_dict()


def test_adapted_projection_is_not_fused():
    """A wrapped projection (as LoRA installs) must run its own forward: fusion would skip the adapter."""
    _, model = _pair()
    layer = model.attention_layers()[0]
    assert layer._fusable(layer.to_q, layer.to_k, layer.to_v)
    calls = []
    layer.to_k.register_forward_hook(lambda *_: calls.append(1))
    assert not layer._fusable(layer.to_q, layer.to_k, layer.to_v)
    x = torch.randn(2, 5, layer.to_q.in_features)
    layer(x)
    assert calls == [1]


def test_gated_gelu_gradients_match_autograd():
    projected = torch.randn(4, 6, 2 * 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(_GatedGELU.apply, (projected,))
    h, gate = projected.chunk(2, dim=-1)
    expected = torch.autograd.grad((h * F.gelu(gate)).sin().sum(), projected)[0]
    actual = torch.autograd.grad(_GatedGELU.apply(projected).sin().sum(), projected)[0]
    torch.testing.assert_close(actual, expected)
    geglu = GEGLU(5, 7)
    x = torch.randn(3, 5)
    h, gate = geglu.proj(x).chunk(2, dim=-1)
    torch.testing.assert_close(geglu(x), h * F.gelu(gate))


def test_trimmed_padding_gives_the_same_output():
    trimmed, full = _pair(trim_masked_context=False)
    x, t, context, mask = _inputs()
    seen = []
    layer = trimmed.attention_layers()[1]  # attn2 of the first block: cross-attention
    assert layer.is_cross
    layer.register_forward_pre_hook(lambda _, args: seen.append(args[1].shape[1]))
    with torch.no_grad():
        torch.testing.assert_close(trimmed(x, t, context, mask), full(x, t, context, mask), atol=1e-5, rtol=1e-5)
    assert seen == [5]  # the longest prompt; positions 5..8 are padding in every row
    # a row that attends to nothing keeps the full context (its weights would otherwise change)
    mask[0] = False
    seen.clear()
    with torch.no_grad():
        torch.testing.assert_close(trimmed(x, t, context, mask), full(x, t, context, mask))
    assert seen == [9]


def test_cached_context_is_reused_and_matches_recomputing():
    cached, plain = _pair()
    x, t, context, mask = _inputs()
    cross = [layer for layer in cached.attention_layers() if layer.is_cross]
    with torch.no_grad():
        expected = [plain(x, t, context, mask), plain(x * 0.5, t, context, mask)]
        with cached.cache_context():
            first = cached(x, t, context, mask)
            keys = [layer.context_cache["k"] for layer in cross]
            second = cached(x * 0.5, t, context.clone(), mask.clone())  # equal values, other tensors
            assert all(layer.context_cache["k"] is k for layer, k in zip(cross, keys))
            other = cached(x, t, context + 1, mask)  # a new context is projected anew
            assert all(layer.context_cache["k"] is not k for layer, k in zip(cross, keys))
    assert all(layer.context_cache is None for layer in cross)
    torch.testing.assert_close(first, expected[0])
    torch.testing.assert_close(second, expected[1])
    with torch.no_grad():
        torch.testing.assert_close(other, plain(x, t, context + 1, mask))


def test_cached_context_is_not_used_with_autograd():
    model, _ = _pair()
    x, t, context, mask = _inputs()
    with model.cache_context():
        model(x, t, context, mask).sum().backward()
        assert all(not layer.context_cache for layer in model.attention_layers() if layer.is_cross)
    assert next(model.parameters()).grad is not None


@pytest.mark.parametrize("use_linear", [False, True], ids=["conv-proj", "linear-proj"])
def test_channels_last_input_gives_the_same_output(use_linear):
    model = _model(**(dict(num_heads=None, head_dim=16, use_linear_projection=True) if use_linear else {}))
    x, t, context, mask = _inputs()
    with torch.no_grad():
        expected = model(x, t, context, mask)
        out = model(x.contiguous(memory_format=torch.channels_last), t, context, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_channels_last_weights_give_the_same_output_and_gradients():
    """sample.py's channels_last=true: NHWC weights (and the activations they produce) are a layout change only."""
    plain, nhwc = _pair()
    nhwc.to(memory_format=torch.channels_last)
    conv = nhwc.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    outs = _forward_backward(plain, nhwc)
    assert outs[1].is_contiguous(memory_format=torch.channels_last)  # the layout really carried through
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_grads(plain), _grads(nhwc), atol=1e-5, rtol=1e-4)
