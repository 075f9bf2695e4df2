"""The parts of a LatentDiffusion model made from configs and files: the conditioner, the frozen autoencoder, and
what a file of weights is (a stage-2 checkpoint of this framework, a diffusers folder, a Stable Diffusion single
file), plus `SourceWeights`, what a run started from imported weights (``init_from``) takes from them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import hydra
import torch
from safetensors import safe_open
from torch import nn

from ldm.conditioning.trainable_text import TARGET as TRAINABLE_TEXT_TARGET
from ldm.convert import ConversionError, convert
from ldm.convert.parts import build_autoencoder
from ldm.modules.autoencoder import AutoencoderKL, saved_config
from ldm.weights_io import CheckpointError, load_checkpoint

FROZEN_TEXT_TARGET = "ldm.conditioning.text.FrozenOpenCLIPTextEncoder"
SINGLE_FILE_EMA_PREFIX = "model_ema."
# UNetModel arguments that do not change the weights' shapes: a run keeps its own when it imports weights.
UNET_RUNTIME_KEYS = ("dropout", "gradient_checkpointing", "attention_backend")


def build_conditioner(config: dict, seed: int = 0, trainable: bool = False) -> nn.Module:
    """Instantiate a conditioner from its config. Random-weight stand-ins are drawn from a fixed seed, so the
    same config rebuilds the same frozen encoder when a checkpoint (which does not store it) is loaded.
    ``trainable``: the open_clip text encoder's trainable variant (fine-tuning it, or adapters in it)."""
    if trainable:
        if config.get("_target_") not in (FROZEN_TEXT_TARGET, TRAINABLE_TEXT_TARGET):
            raise ValueError(f"train_conditioner / lora.text_encoder need an open_clip text encoder "
                             f"({FROZEN_TEXT_TARGET}), not {config.get('_target_')}")
        config = {**config, "_target_": TRAINABLE_TEXT_TARGET}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        conditioner = hydra.utils.instantiate(config, _convert_="all")
    if conditioner.frozen:
        conditioner.requires_grad_(False).eval()
    return conditioner


def load_autoencoder(ckpt_path: str | os.PathLike) -> tuple[AutoencoderKL, dict, float | None]:
    """The frozen autoencoder: (model, its config, the measured latent std or None).

    ``ckpt_path``: a stage-1 checkpoint of this framework, or Stable Diffusion's autoencoder in a diffusers
    folder (vae/) or an SD single file (first_stage_model.*), as MLPerf's SD benchmark takes it from SD2's
    checkpoint. Imported autoencoders bring their latent scale factor (0.18215 for SD's KL-f8)."""
    path = Path(ckpt_path).expanduser()
    if path.is_dir() or path.suffix == ".safetensors":
        return _imported_autoencoder(path)
    ckpt = load_checkpoint(path, "autoencoder checkpoint (autoencoder.ckpt_path)")
    hparams = ckpt.get("hyper_parameters", {})
    if "autoencoder" not in hparams:
        if any(str(k).startswith("first_stage_model.") for k in ckpt.get("state_dict", {})):
            return _imported_autoencoder(path)
        raise ValueError(f"{ckpt_path} is neither a stage-1 checkpoint of this framework (no 'autoencoder' "
                         "hyperparameters) nor a Stable Diffusion file with an autoencoder (first_stage_model.*)")
    config = saved_config(hparams["autoencoder"])  # checkpoints from before the norm setting: GroupNorm(32)
    model = AutoencoderKL(**config)
    prefix = "autoencoder."
    model.load_state_dict({k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)},
                          strict=True)
    latent_std = ckpt["state_dict"].get("latent_std")
    return model, config, None if latent_std is None else float(latent_std)


def _imported_autoencoder(path: Path) -> tuple[AutoencoderKL, dict, None]:
    converted = convert(path)
    if converted.autoencoder_state is None:
        raise ValueError(f"autoencoder.ckpt_path {path} holds no autoencoder (no vae/ folder or first_stage_model.*)")
    config = dict(converted.autoencoder_config)
    return build_autoencoder(config, converted.autoencoder_state), config, None


# -- what a file of weights is ----------------------------------------------------------------------------------


def source_kind(path: str | os.PathLike, what: str = "init_from") -> tuple[str, dict[str, Any] | None]:
    """("diffusers" | "single_file" | "stage2", the loaded checkpoint for "stage2" else None)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_dir():
        if (path / "unet").is_dir() or (path / "model_index.json").is_file():
            return "diffusers", None
        raise ConversionError(f"{what} {path} is a folder but not a diffusers pipeline folder "
                              "(no unet/ or model_index.json)")
    if path.suffix == ".safetensors":
        return "single_file", None  # this framework writes stage-2 checkpoints as .ckpt only
    try:
        ckpt = load_checkpoint(path, what)
    except CheckpointError:
        # Let the single-file reader give its own, more precise message (e.g. the global a pickle refers to).
        return "single_file", None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if isinstance(hparams, dict) and "unet" in hparams and "autoencoder" in hparams:
        return "stage2", ckpt
    if isinstance(hparams, dict) and "autoencoder" in hparams:
        raise ConversionError(f"{what} {path} is a stage-1 (autoencoder) checkpoint, not a text-to-image model "
                              "(it goes to autoencoder.ckpt_path)")
    return "single_file", None


def single_file_has_ema(path: Path) -> bool:
    """Whether a single file holds CompVis' EMA copy of the U-Net; reads the key list only."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
        else:
            contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            keys = list(contents.get("state_dict", contents))
    except Exception:  # noqa: BLE001 - unreadable here: the converter reports it properly
        return False
    return any(k.startswith(SINGLE_FILE_EMA_PREFIX) and not k.endswith(("decay", "num_updates")) for k in keys)


def native_latent_size(path: str | os.PathLike, kind: str) -> int:
    """The latent size imported weights were trained at: diffusers' U-Net ``sample_size``, else SD's 64."""
    config = Path(path) / "unet" / "config.json"
    if kind == "diffusers" and config.is_file():
        return int(json.loads(config.read_text()).get("sample_size") or 64)
    return 64


class SourceWeights:
    """What a run started from imported weights (``init_from``) takes from them. A plain class (not a dataclass),
    so that Hydra passes it untouched instead of turning it into a config.

    unet_config / unet_state: UNetModel kwargs and weights. autoencoder_config (with ``scale_factor``) /
    autoencoder_state: None when the source has no autoencoder. conditioner_config: a conditioner config with
    ``_target_`` (None: keep the run's); conditioner_seed / conditioner_state: the seed a random-weight stand-in is
    drawn from, and weights of a trainable conditioner, where the source has them. prediction_type /
    schedule_config: None where the source does not say. resolution: the image size the source model was trained
    at (a stage-2 checkpoint's sampling size; diffusers' U-Net sample_size × the autoencoder's downsampling; 512
    for SD single files), the default of DreamBooth's data.resolution.
    """

    def __init__(
        self,
        source: str,
        unet_config: dict,
        unet_state: dict[str, torch.Tensor],
        autoencoder_config: dict | None = None,
        autoencoder_state: dict[str, torch.Tensor] | None = None,
        conditioner_config: dict | None = None,
        conditioner_seed: int | None = None,
        conditioner_state: dict[str, torch.Tensor] | None = None,
        prediction_type: str | None = None,
        schedule_config: dict | None = None,
        resolution: int | None = None,
    ):
        self.source = source
        self.unet_config = dict(unet_config)
        self.unet_state = unet_state
        self.autoencoder_config = None if autoencoder_config is None else dict(autoencoder_config)
        self.autoencoder_state = autoencoder_state
        self.conditioner_config = None if conditioner_config is None else dict(conditioner_config)
        self.conditioner_seed = conditioner_seed
        self.conditioner_state = conditioner_state
        self.prediction_type = prediction_type
        self.schedule_config = None if schedule_config is None else dict(schedule_config)
        self.resolution = resolution

    def unet_kwargs(self, run_unet: dict) -> dict:
        """The U-Net's architecture from the weights, with the run's runtime choices."""
        kwargs = dict(self.unet_config)
        kwargs.update({k: run_unet[k] for k in UNET_RUNTIME_KEYS if k in run_unet})
        return kwargs

    def differing_unet_keys(self, run_unet: dict) -> list[str]:
        return sorted(k for k in self.unet_config if k in run_unet and k not in UNET_RUNTIME_KEYS
                      and run_unet[k] != self.unet_config[k])

    def __repr__(self) -> str:
        return f"SourceWeights({self.source!r})"
