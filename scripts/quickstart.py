"""The quick start's main job. For now: build the core networks at the emoji and Stable Diffusion sizes
and report their parameter counts (the training pipeline will take this place)."""

import torch

from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.unet import UNetModel


def main() -> None:
    with torch.device("meta"):
        models = {
            "U-Net SD1": UNetModel(num_heads=8, context_dim=768),
            "U-Net SD2": UNetModel(num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True),
            "VAE KL-f8": AutoencoderKL(),
        }
    for name, model in models.items():
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
