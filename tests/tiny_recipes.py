"""The Stable Diffusion recipes (configs/experiment/sd*.yaml) at CPU size: overrides that shrink widths,
resolution and batch and keep the structure (levels, res blocks, attention levels, text tower depth, prediction
type, schedules, loss terms), and the local files the recipes require, made with random weights.

Used by tests/test_recipes.py and by `bench/recipe_throughput.py --tiny`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

# Every recipe on the CPU: one process, 2 images per optimizer step, short sampling, no progress bar.
CPU = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=1", "global_batch_size=2",
       "data.num_workers=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]

# The SD2 U-Net narrowed (320 → 32 channels, 64 → 16 channels per head, context 1024 → 64); its 4 levels, 2 res
# blocks per level and transformers at downsampling 1, 2 and 4 stay. 64 px images: 8×8 latents, 1×1 at the
# bottom level, as 512 px give 64×64 and 8×8.
SD2_UNET = ["model.unet.model_channels=32", "model.unet.head_dim=16", "model.unet.context_dim=64"]
STAGE2 = [*SD2_UNET, "data.resolution=64", "model.sampling.steps=2", "callbacks.sample_images.steps=2"]

# SD's KL-f8 autoencoder with 32 base channels instead of 128 (levels, res blocks and z channels kept) and a
# discriminator 8 channels wide instead of 64 (3 layers kept); 64 px images. The discriminator starts at the
# second step, not the 50,001st, so that both phases of the loss run.
AUTOENCODER = ["model.autoencoder.ch=32", "model.loss.disc_channels=8", "data.resolution=64",
               "model.loss.disc_start=1", "model.log_images_every_n_steps=1"]

# open_clip's ViT-H-14 text tower with width 1024 → 64 and 16 → 4 heads (64 → 16 per head); its 24 blocks, 77
# positions and vocabulary stay. The image tower, which the text encoder throws away, is one tiny layer.
TEXT_WIDTH, TEXT_HEADS = 64, 4


def sd2_text_tower(directory: Path, seed: int = 0) -> tuple[str, Path]:
    """(arch, weights file) of the shrunk ViT-H-14 text tower: model.conditioner.arch and .pretrained."""
    import open_clip

    from ldm.conditioning.text import FrozenOpenCLIPTextEncoder
    from ldm.convert.clip_text import open_clip_arch_for

    directory.mkdir(parents=True, exist_ok=True)
    text_cfg = dict(open_clip.get_model_config("ViT-H-14")["text_cfg"], width=TEXT_WIDTH, heads=TEXT_HEADS)
    arch, _ = open_clip_arch_for(text_cfg, quick_gelu=False, directory=str(directory))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = FrozenOpenCLIPTextEncoder(arch=arch)
    weights = directory / "text_tower.pt"
    torch.save(encoder.text.state_dict(), weights)
    return arch, weights


def text_overrides(arch: str, weights: Path) -> list[str]:
    return [f"model.conditioner.arch='{arch}'", f"model.conditioner.pretrained={weights}"]


def lpips_files(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """Random-weight LPIPS files in the layouts users have: VGG16's convolutions (torchvision key names) and
    the lpips package's five linear layers."""
    from torchvision.models.vgg import cfgs, make_layers

    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = make_layers(cfgs["D"])
        lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    vgg, lin_path = directory / "vgg16_features.pth", directory / "lpips_vgg.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, vgg)
    torch.save(lin, lin_path)
    return vgg, lin_path


def autoencoder_f8_ckpt(directory: Path, seed: int = 0) -> Path:
    """A stage-1 checkpoint (this framework's format) of the shrunk KL-f8 autoencoder with random weights."""
    from ldm.modules.autoencoder import AutoencoderKL

    config = dict(ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKL(**config)
    state = {f"autoencoder.{k}": v for k, v in model.state_dict().items()}
    state["latent_std"] = torch.tensor(1.0)
    path = directory / "autoencoder_f8.ckpt"
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": {"autoencoder": config}, "state_dict": state}, path)
    return path


CAPTIONS = ["a red square on white", "a blue circle", "two green stripes", "a yellow triangle at night",
            "an orange ring", "a purple dot", "black and white checks", "a grey cloud"]


def image_shards(directory: Path, n: int = 8, size: int = 72, shard_size: int = 4) -> Path:
    """Real webdataset shards (img2dataset layout: {key}.png + {key}.txt) of n patterned images."""
    from PIL import Image

    from ldm.data.writer import TarShardWriter

    rng = np.random.default_rng(0)
    with TarShardWriter(directory, prefix="images", shard_size=shard_size) as writer:
        for i in range(n):
            pixels = np.full((size, size + 8 * (i % 2), 3), 255, np.uint8)
            y, x = rng.integers(0, size // 2, 2)
            pixels[y : y + size // 2, x : x + size // 2] = rng.integers(0, 255, 3)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            writer.write(f"{i:05d}", {"png": buffer.getvalue(), "txt": CAPTIONS[i % len(CAPTIONS)]})
    return directory
