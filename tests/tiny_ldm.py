"""A stage-2 model small enough to train in-process in a second: for tests of training options.

8×8 images, a one-level autoencoder (f = 1) and U-Net, class labels as "captions" (no text tower to build).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from ldm.modules.autoencoder import AutoencoderKL

AUTOENCODER = dict(ch=32, ch_mult=(1,), num_res_blocks=1, z_channels=4)
UNET = dict(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(1,), num_heads=2,
            context_dim=32)
CONDITIONER = {"_target_": "ldm.conditioning.class_label.ClassLabelEncoder", "num_classes": 4, "dim": 32}
SIZE = 8


def autoencoder_ckpt(directory: Path) -> Path:
    """A stage-1 checkpoint of a random-weight autoencoder, in this framework's format."""
    path = Path(directory) / "tiny_autoencoder.ckpt"
    if not path.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            model = AutoencoderKL(**AUTOENCODER)
        state = {f"autoencoder.{k}": v for k, v in model.state_dict().items()}
        state["latent_std"] = torch.tensor(1.0)
        torch.save({"hyper_parameters": {"autoencoder": AUTOENCODER}, "state_dict": state}, path)
    return path


def module(ae_ckpt: Path, **overrides):
    from ldm.training.diffusion_module import DiffusionModule

    kwargs = dict(unet=UNET, conditioner=CONDITIONER, schedule={}, autoencoder_ckpt=str(ae_ckpt),
                  ema={"decay": 0.9}, ucg_rate=0.0, sampling={"image_size": SIZE, "steps": 2, "prompts": ["1"]},
                  optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
                  lr_schedule={"kind": "constant", "warmup_steps": 0})
    kwargs.update(overrides)
    return DiffusionModule.from_settings(kwargs)


def batch(n: int = 4, start: int = 0) -> dict:
    """n samples with fixed images (from their index), labels as captions and keys."""
    images = torch.stack([torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(start + i)) * 2 - 1
                          for i in range(n)])
    return {"image": images, "caption": [str((start + i) % 4) for i in range(n)],
            "key": [f"k{start + i:04d}" for i in range(n)]}


class Batches(torch.utils.data.IterableDataset):
    """The same batches every epoch: `repeat` copies of batch(n) (samples 0..n-1) or, with `vary`, batches of
    successive samples."""

    def __init__(self, n: int = 4, count: int = 100, vary: bool = False):
        self.n, self.count, self.vary = n, count, vary

    def __iter__(self):
        for k in range(self.count):
            yield batch(self.n, start=k * self.n if self.vary else 0)

    def __len__(self) -> int:
        return self.count


class Data(L.LightningDataModule):
    def __init__(self, n: int = 4, count: int = 100, vary: bool = False):
        super().__init__()
        self.dataset = Batches(n, count, vary)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.dataset, batch_size=None)


def trainer(directory: Path, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   default_root_dir=str(directory))
    options.update(kwargs)
    return L.Trainer(**options)
