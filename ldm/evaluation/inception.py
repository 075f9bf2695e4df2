"""The FID Inception network as a feature extractor: images in [-1, 1] → (N, 2048) pool features.

The network is torchmetrics' ``NoTrainInceptionV3``, torch-fidelity's port of the TensorFlow Inception that
FID was defined with (Heusel et al. 2017), so with the standard weights file
(``pt_inception-2015-12-05-6726825d.pth``, also used by pytorch-fid and torch-fidelity) the features — and so
FID and KID — are the ones published numbers use. The weights load from a local file only; nothing is
downloaded. Without weights, ``random_seed`` gives seeded random weights: the features are then a fixed
random projection of the images, good for tests and for comparing runs with each other, not with any
published number. ``identity`` records which of the two made a set of features, so statistics made by one
are never compared with features of the other.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from torch import nn

# The key of the stub state dict that hands our weights source to torch-fidelity's constructor (below).
_SOURCE = "__ldm_weights_source__"
FEATURE_SIZES = (64, 192, 768, 2048)  # the network's pooled outputs torchmetrics offers; FID uses 2048
INPUT_SIZE = 299  # the network's input: every image is resized to 299×299 first


def file_digest(path: str | Path, length: int = 16) -> str:
    """The first ``length`` hex digits of the file's SHA-256: names a weights file by its content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] → uint8 (N, 3, H, W): the same quantisation as writing a PNG, so generated
    images and reference images read from files enter the network alike."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _inception_class():
    # A config that asks for FID without the extra installed is a setup mistake: one line (ValueError) naming it.
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError as e:  # pragma: no cover - torchmetrics comes with lightning
        raise ValueError(f"FID needs torchmetrics ({e}): pip install -e '.[eval]'") from None
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ValueError("FID's Inception network needs torch-fidelity: pip install -e '.[eval]'")

    class _Inception(NoTrainInceptionV3):
        # torch-fidelity's constructor reads its weights with a full unpickle (torch.load(weights_only=False)) or
        # downloads them. It is handed a stub naming the source instead, and the weights are loaded here: a local
        # file with weights_only=True, or seeded random values.
        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            if _SOURCE not in state_dict:
                return super().load_state_dict(state_dict, strict, assign)
            source = state_dict[_SOURCE]
            if isinstance(source, int):
                return self._randomise(source)
            weights = torch.load(source, map_location="cpu", weights_only=True)
            if isinstance(weights, dict) and "state_dict" in weights:
                weights = weights["state_dict"]
            return super().load_state_dict(weights, strict=True)

        @torch.no_grad()
        def _randomise(self, seed: int):
            # He-normal convolutions and identity batch norms keep the activations' scale through the ~50 layers
            # (PyTorch's default init shrinks it ~6× per layer, leaving features near 1e-15).
            g = torch.Generator().manual_seed(seed)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                elif isinstance(m, nn.BatchNorm2d):
                    m.reset_parameters()
                elif isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
                    m.bias.zero_()

    return _Inception


class InceptionFeatures(nn.Module):
    """Images → FID features. ``weights``: a local Inception weights file (torch-fidelity / pytorch-fid
    format); ``random_seed``: seeded random weights instead (tests, self-consistent numbers only).
    ``antialias``: resize to 299 px with an antialiased bilinear filter (torchmetrics' default) rather than
    TensorFlow 1's aliasing one (the original FID code's). ``features``: 2048 (the pool features FID is defined
    on) or an earlier, smaller pooled output (64, 192, 768: cheaper, for tests)."""

    def __init__(self, weights: str | Path | None = None, random_seed: int | None = None, antialias: bool = True,
                 features: int = 2048):
        super().__init__()
        if features not in FEATURE_SIZES:
            raise ValueError(f"Inception features must be one of {FEATURE_SIZES}, got {features}")
        if (weights is None) == (random_seed is None):
            raise ValueError("InceptionFeatures needs exactly one of weights (a local file) and random_seed")
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"Inception weights file not found: {weights}")
        stub = io.BytesIO()
        torch.save({_SOURCE: str(weights) if weights is not None else int(random_seed)}, stub)
        stub.seek(0)
        with torch.random.fork_rng(devices=[]):  # the layers' default init draws from the global generator
            self.net = _inception_class()("inception-v3-compat", [str(features)], stub, antialias=antialias)
        # NHWC: faster convolutions on the CPU (scripts/measure_evaluation_cost.py), the same features to float
        # rounding.
        self.net.to(memory_format=torch.channels_last)
        self.antialias = antialias
        self.identity = {
            "network": "inception-v3-compat (torchmetrics / torch-fidelity FID Inception)",
            "features": features,
            "weights": f"sha256:{file_digest(weights)}" if weights is not None else f"random weights, seed {random_seed}",
            "preprocessing": f"uint8 RGB, resized to {INPUT_SIZE}x{INPUT_SIZE} "
                             + ("bilinear antialiased" if antialias else "bilinear as TensorFlow 1"),
        }

    @property
    def random(self) -> bool:
        return self.identity["weights"].startswith("random")

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] → (N, features) float32."""
        device = next(self.net.parameters()).device
        x = to_uint8(images).to(device).contiguous(memory_format=torch.channels_last)
        return self.net(x).float()
