"""The shapes of the reference models, in one place: Stable Diffusion 1.x and 2.x U-Nets, the emoji U-Net, SD's KL-f8
autoencoder. The Hydra configs take them from here (configs/model/unet/*.yaml and configs/model/autoencoder.yaml
name them in their defaults: Hydra's search path includes this package), and so do the converters, the
benchmarks and the tests (`unet_preset("sd1")`)."""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def _load(kind: str, name: str) -> dict:
    path = HERE / kind / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (HERE / kind).glob("*.yaml"))
        raise ValueError(f"no {kind} preset {name!r}; the presets are {known}")
    return dict(yaml.safe_load(path.read_text()))


def unet_preset(name: str) -> dict:
    """UNetModel arguments that fix a U-Net's shape: "sd1", "sd2" or "emoji"."""
    return _load("unet", name)


def autoencoder_preset(name: str) -> dict:
    """AutoencoderKL arguments (and latent scale factor) of an autoencoder: "kl_f8"."""
    return _load("autoencoder", name)
