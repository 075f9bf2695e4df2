import warnings

import pytest
import torch

from ldm.modules import attention as attn_mod
from ldm.modules.attention import attention, math_attention, resolve_backend, xformers_available

HEADS = 4


def _inputs(device, lq=19, lk=13, b=3, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, HEADS * d, generator=g).to(device, dtype) for n in (lq, lk, lk))
    return q, k, v


def _masks(b, lk, device):
    padding = torch.ones(b, lk, dtype=torch.bool)
    padding[1, 5:] = False
    padding[2, 9:] = False
    only_one = torch.zeros(b, lk, dtype=torch.bool)  # every row keeps exactly one key
    only_one[torch.arange(b), torch.tensor([0, 4, 12])] = True
    return {"none": None, "padding": padding.to(device), "all-but-one-masked": only_one.to(device)}


def _available_backends(device):
    backends = ["sdpa", "math"]
    if device.type == "cuda" and xformers_available():
        backends.append("xformers")
    return backends


devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "padding", "all-but-one-masked"])
def test_backends_agree_with_math(device, mask_kind):
    q, k, v = _inputs(device)
    mask = _masks(3, 13, device)[mask_kind]
    ref, probs = math_attention(q, k, v, HEADS, mask)
    for backend in _available_backends(device):
        out = attention(q, k, v, HEADS, mask=mask, backend=backend)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=f"{backend} differs from math")
    if mask is not None:
        # Masked keys get exactly zero weight.
        assert probs.masked_select(~mask[:, None, None, :].expand_as(probs)).abs().max() == 0


def test_math_path_matches_a_naive_loop():
    q, k, v = _inputs("cpu", lq=5, lk=7, b=2, d=3)
    out, probs = math_attention(q, k, v, HEADS)
    for h in range(HEADS):
        sl = slice(h * 3, (h + 1) * 3)
        w = (q[:, :, sl] @ k[:, :, sl].transpose(1, 2) / 3**0.5).softmax(-1)
        torch.testing.assert_close(probs[:, h], w)
        torch.testing.assert_close(out[:, :, sl], w @ v[:, :, sl])


def test_return_probs_gives_probabilities():
    q, k, v = _inputs("cpu")
    out, probs = attention(q, k, v, HEADS, return_probs=True)
    assert probs.shape == (3, HEADS, 19, 13)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, HEADS, 19))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers has no CPU kernels; needs a CUDA device")
def test_xformers_runs_on_cuda():
    assert xformers_available(), "xformers should be installed on GPU machines (pip install '.[xformers]')"
    assert resolve_backend("auto", torch.device("cuda")) == "xformers"


def test_auto_picks_sdpa_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"


def test_xformers_on_cpu_warns_once_and_falls_back():
    attn_mod._warn_once.cache_clear()
    q, k, v = _inputs("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = attention(q, k, v, HEADS, backend="xformers")
        out2 = attention(q, k, v, HEADS, backend="xformers")
    relevant = [w for w in caught if "xformers" in str(w.message)]
    assert len(relevant) == 1 and "falling back to 'sdpa'" in str(relevant[0].message)
    torch.testing.assert_close(out1, math_attention(q, k, v, HEADS)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out1, out2)


def test_unknown_backend_is_named():
    q, k, v = _inputs("cpu")
    with pytest.raises(ValueError, match="'flash3'.*auto, xformers, sdpa, math"):
        attention(q, k, v, HEADS, backend="flash3")


def test_default_backend_switch():
    try:
        attn_mod.set_attention_backend("math")
        assert resolve_backend("auto", torch.device("cpu")) == "math"
    finally:
        attn_mod.set_attention_backend("auto")
