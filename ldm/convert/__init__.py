"""Pretrained Stable Diffusion 1.x / 2.x weights → our U-Net, autoencoder and text encoder, and back.

    parts = load_pretrained("v1-5-pruned-emaonly.safetensors")     # or a diffusers folder
    parts.unet, parts.unet_config              # UNetModel (fp32, eval) and its kwargs
    parts.autoencoder, parts.autoencoder_config
    encoder = parts.build_conditioner()        # FrozenOpenCLIPTextEncoder with the converted weights
    config = parts.write_conditioner("runs/x/text_encoder")   # a conditioner config loadable anywhere

Sources: a diffusers pipeline folder (``diffusers_layout``) or one CompVis-layout .safetensors/.ckpt
(``single_file``). The configuration is read from config.json files, from our own metadata, or inferred from
the weights (``infer``); ``config="sd1" | "sd2"`` or a dict names it instead. Every key is accounted for: a
missing, unmapped or misshapen one raises ``ConversionError`` naming it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.convert.clip_text import SD1_CONDITIONER, SD2_CONDITIONER, TEXT_ENCODER_TARGET, conditioner_from_state
from ldm.convert.diffusers_layout import convert_diffusers
from ldm.convert.infer import AUTOENCODER_PRESET, UNET_PRESETS
from ldm.convert.key_mapping import ConversionError
from ldm.convert.parts import ConvertedWeights, PretrainedParts
from ldm.convert.single_file import convert_single_file, save_single_file

logger = logging.getLogger(__name__)

__all__ = [
    "ConversionError",
    "ConvertedWeights",
    "PretrainedParts",
    "conditioner_from_state",
    "convert",
    "load_pretrained",
    "load_unet_state",
    "save_single_file",
]

KINDS = ("diffusers", "single_file")
_PARTS = ("unet", "autoencoder", "conditioner")


def _explicit_configs(config: str | Mapping[str, Any] | None) -> dict[str, dict]:
    """Named configs per part: "sd1" / "sd2", or {"unet": ..., "autoencoder": ..., "conditioner": ...}."""
    if config is None:
        return {}
    if isinstance(config, str):
        if config not in UNET_PRESETS:
            raise ConversionError(f"unknown config {config!r}; choose one of {sorted(UNET_PRESETS)} or pass a dict")
        text = SD1_CONDITIONER if config == "sd1" else SD2_CONDITIONER
        return {"unet": dict(UNET_PRESETS[config]), "autoencoder": dict(AUTOENCODER_PRESET),
                "conditioner": {"_target_": TEXT_ENCODER_TARGET, **text}}
    unknown = set(config) - set(_PARTS)
    if unknown:
        raise ConversionError(f"config has unknown parts {sorted(unknown)}; expected some of {_PARTS}")
    if "conditioner" in config and "arch" not in config["conditioner"]:
        raise ConversionError("config['conditioner'] must name an open_clip 'arch'")
    return {part: dict(value) for part, value in config.items() if value is not None}


def convert(
    path: str | os.PathLike,
    kind: str | None = None,
    config: str | Mapping[str, Any] | None = None,
    ema: bool = False,
) -> ConvertedWeights:
    """Converts without building modules: our configs and state dicts, checked key by key.

    kind: "diffusers" (a folder with unet/ vae/ text_encoder/) or "single_file"; None decides by the path.
    config: None (read/infer), "sd1" | "sd2", or a dict of full per-part configs.
    ema: single files only: load the EMA U-Net (model_ema.*) instead of the raw one.
    """
    path = Path(path)
    if kind is None:
        kind = "diffusers" if path.is_dir() else "single_file"
    if kind not in KINDS:
        raise ConversionError(f"kind must be one of {KINDS}, got {kind!r}")
    explicit = _explicit_configs(config)
    if kind == "diffusers":
        if ema:
            raise ConversionError("ema=True applies to single files; a diffusers folder holds one U-Net")
        return convert_diffusers(path, explicit)
    return convert_single_file(path, explicit, ema=ema)


def load_pretrained(
    path: str | os.PathLike,
    kind: str | None = None,
    config: str | Mapping[str, Any] | None = None,
    ema: bool = False,
) -> PretrainedParts:
    """Our U-Net and autoencoder (built, fp32, eval) and the text encoder's config and weights."""
    return convert(path, kind, config, ema).build()


def load_unet_state(
    path: str | os.PathLike,
    kind: str | None = None,
    config: str | Mapping[str, Any] | None = None,
    ema: bool = False,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(UNetModel kwargs, state dict) of the U-Net alone, e.g. to initialise training from it."""
    converted = convert(path, kind, config, ema)
    if converted.unet_state is None:
        raise ConversionError(f"{path} holds no U-Net")
    return converted.unet_config, converted.unet_state
