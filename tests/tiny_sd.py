"""Tiny random Stable-Diffusion-shaped models written as a diffusers folder and as a single file, for tests
of imported weights (init_from, sampling, DreamBooth, LoRA). 32 px images, 16×16 latents, 64-wide text."""

from __future__ import annotations

import json
from pathlib import Path

import torch

UNET = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1], num_heads=2,
            head_dim=None, context_dim=64, use_linear_projection=False)
# SD's normalisation, 32 groups at every width (what diffusers builds; our default gives narrow layers fewer).
VAE = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, scale_factor=0.5, norm_group_channels=1)
TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=77, vocab_size=49408)
SCHEDULER = {"prediction_type": "epsilon", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000}


def _perturb(module: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    # Fresh modules have zero-initialised output layers; noise makes every weight matter to the outputs.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module.eval()


def write_diffusers_folder(path: Path, seed: int = 0) -> Path:
    """unet/ vae/ text_encoder/ scheduler/ as diffusers and transformers write them (sample_size 16 → 32 px)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers_oracle import unet_config, vae_config
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    _perturb(UNet2DConditionModel(**dict(unet_config(UNET), sample_size=16))).save_pretrained(path / "unet")
    _perturb(AutoencoderKL(**vae_config(VAE), scaling_factor=VAE["scale_factor"])).save_pretrained(path / "vae")
    _perturb(CLIPTextModel(CLIPTextConfig(**TEXT, hidden_act="quick_gelu"))).save_pretrained(path / "text_encoder")
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return path


def write_single_file(path: Path, seed: int = 0) -> Path:
    """One CompVis-layout .safetensors (ldm.convert.save_single_file) with our configs as metadata."""
    from ldm.conditioning.text import FrozenOpenCLIPTextEncoder
    from ldm.convert import save_single_file
    from ldm.convert.clip_text import open_clip_arch_for
    from ldm.modules.autoencoder import AutoencoderKL
    from ldm.modules.unet import UNetModel

    torch.manual_seed(seed)
    text_cfg = dict(width=64, heads=2, layers=2, context_length=77, vocab_size=49408, mlp_ratio=2.0)
    arch, _ = open_clip_arch_for(text_cfg, quick_gelu=True, directory=str(path.parent))
    encoder = FrozenOpenCLIPTextEncoder(arch=arch, layer="last", pad_token="eos", use_mask=False)
    _perturb(encoder.text)
    save_single_file(path, unet=_perturb(UNetModel(**UNET)), autoencoder=_perturb(AutoencoderKL(**VAE)),
                     conditioner=encoder, prediction_type="eps")
    return path
