"""CLIP score: how well each image matches its prompt, by an open_clip model.

score = cos(image embedding, text embedding) per image, averaged over the images: the measure of the MLPerf
Stable Diffusion benchmark (target ≥ 0.15 with ViT-H-14 on 30,000 COCO captions). torchmetrics' CLIPScore
reports 100·max(cos, 0) instead and only runs Hugging Face CLIP models.

The weights load from a local open_clip checkpoint file (open_clip's own loader, ``weights_only``); nothing
is downloaded. ``random_seed`` builds the architecture with seeded random weights for tests: the score then
only compares runs with each other.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.evaluation.inception import file_digest, to_uint8


class CLIPScorer(nn.Module):
    def __init__(self, arch: str = "ViT-H-14", weights: str | Path | None = None, random_seed: int | None = None):
        super().__init__()
        import open_clip

        if (weights is None) == (random_seed is None):
            raise ValueError("CLIPScorer needs exactly one of weights (a local file) and random_seed")
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"CLIP weights file not found: {weights}")
        with torch.random.fork_rng(devices=[]):  # seeded weights, and the caller's random stream untouched
            torch.manual_seed(0 if random_seed is None else random_seed)
            self.model = open_clip.create_model(arch, pretrained=None)
        if weights is not None:
            open_clip.load_checkpoint(self.model, str(weights))
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        cfg = self.model.visual.preprocess_cfg
        self.image_size = tuple(cfg["size"]) if isinstance(cfg["size"], (tuple, list)) else (cfg["size"],) * 2
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.identity = {
            "network": f"open_clip {arch}",
            "weights": f"sha256:{file_digest(weights)}" if weights is not None else f"random weights, seed {random_seed}",
        }

    @property
    def random(self) -> bool:
        return self.identity["weights"].startswith("random")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] → the model's input: quantised to uint8 like a saved image, resized (bicubic,
        antialiased) to its input size, normalised with its mean and std. open_clip's own transform does the same
        with PIL on one image at a time; square images need no crop."""
        x = to_uint8(images).float().div(255).to(self.mean.device)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        return (x.clamp(0, 1) - self.mean) / self.std

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with its prompt: (N,) float32."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        image_features = F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)
        tokens = self.tokenizer(prompts).to(self.mean.device)
        text_features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (image_features * text_features).sum(-1)
