"""LPIPS perceptual distance (Zhang et al. 2018), VGG16 variant, loaded only from local weight files.

Nothing can be downloaded at run time, so both parts come from files the user already has:
``vgg_path`` (torchvision's ``vgg16`` state dict, e.g. vgg16-397923af.pth; only its ``features.*`` convolutions
are read, so a file holding just those serves too) and ``lin_path`` (the lpips package's ``vgg.pth`` with the
five ``linN.model.1.weight`` 1×1 layers). A missing file is a clear error, never a silent random network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# Output channels of the VGG16 stages whose activations LPIPS compares, and the layer index ending each.
_STAGE_CHANNELS = (64, 128, 256, 512, 512)
_STAGE_ENDS = (4, 9, 16, 23, 30)


def _load(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS {what} weights not found at {path}; set the path or disable LPIPS")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class LPIPS(nn.Module):
    def __init__(self, vgg_path: str | Path, lin_path: str | Path):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # VGG16's convolutional part alone, indexed as torchvision's vgg16().features: its 124 M-parameter
        # classifier plays no part in LPIPS, so it is neither built nor read.
        features = make_layers(cfgs["D"])
        state = {k[len("features."):]: v for k, v in _load(vgg_path, "VGG16").items() if k.startswith("features.")}
        missing = sorted(set(features.state_dict()) - set(state))
        if missing:
            raise ValueError(f"{vgg_path}: not a torchvision vgg16 state dict (missing features.{missing[0]} and "
                             f"{len(missing) - 1} more)")
        features.load_state_dict(state, strict=True)
        features = features[: _STAGE_ENDS[-1]]
        self.stages = nn.ModuleList()
        start = 0
        for end in _STAGE_ENDS:
            self.stages.append(features[start:end])
            start = end
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _STAGE_CHANNELS)
        lin_state = _load(lin_path, "linear-layer")
        for i, lin in enumerate(self.lins):
            lin.weight.data.copy_(lin_state[f"lin{i}.model.1.weight"])
        # ImageNet statistics in the [-1, 1] input convention of the lpips package.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # a fixed metric: BatchNorm-free, but keep it in eval regardless

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, 3, H, W) in [-1, 1] → (B,) distances."""
        h_x, h_y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = 0.0
        for stage, lin in zip(self.stages, self.lins):
            h_x, h_y = stage(h_x), stage(h_y)
            n_x = h_x / (h_x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            n_y = h_y / (h_y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((n_x - n_y) ** 2).mean(dim=(1, 2, 3))
        return total
