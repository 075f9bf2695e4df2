"""What a conversion produces (our configs and state dicts, or our built modules) and how the parts are built.

The converters (`diffusers_layout`, `single_file`) fill a `ConvertedWeights` through the strict plans of
`key_mapping`; `ConvertedWeights.build()` makes the modules of a `PretrainedParts`. The text encoder stays
a config and an open_clip-layout state dict until asked for (`build_conditioner`, `write_conditioner`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ldm.conditioning.text import FrozenOpenCLIPTextEncoder
from ldm.convert.clip_text import conditioner_from_state, write_text_weights
from ldm.convert.key_mapping import ConversionError
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.unet import UNetModel


def expected_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, torch.Size]:
    """Parameter shapes of a model, built on the meta device: no memory, no initialisation cost."""
    with torch.device("meta"):
        model = build()
    return {k: v.shape for k, v in model.state_dict().items()}


def unet_shapes(config: Mapping[str, Any]) -> dict[str, torch.Size]:
    return expected_shapes(lambda: UNetModel(**config))


def autoencoder_shapes(config: Mapping[str, Any]) -> dict[str, torch.Size]:
    return expected_shapes(lambda: AutoencoderKL(**config))


class _TextWeights:
    """Text encoder helpers shared by converted weights and built parts."""

    conditioner_state: dict[str, torch.Tensor] | None
    conditioner_config: dict | None
    open_clip_model_cfg: dict | None

    def build_conditioner(self, **overrides: Any) -> FrozenOpenCLIPTextEncoder:
        """A FrozenOpenCLIPTextEncoder with the converted weights; ``overrides`` change its kwargs."""
        if self.conditioner_state is None or self.conditioner_config is None:
            raise ConversionError("these pretrained parts have no text encoder")
        return conditioner_from_state({**self.conditioner_config, **overrides}, self.conditioner_state)

    def write_conditioner(self, directory: str | os.PathLike) -> dict:
        """Writes the text weights to ``directory`` and returns a conditioner config that loads them.

        The config has ``pretrained`` set to the weights file, so it can be instantiated in any process
        (training, sampling), as any other conditioner config is.
        """
        if self.conditioner_state is None or self.conditioner_config is None:
            raise ConversionError("these pretrained parts have no text encoder")
        return write_text_weights(directory, self.conditioner_config, self.conditioner_state,
                                  self.open_clip_model_cfg)


@dataclass
class PretrainedParts(_TextWeights):
    """A pretrained text-to-image model converted to ours.

    unet, autoencoder: our modules (fp32, eval mode) or None when the source has no such part.
    *_config: constructor arguments of those modules (UNetModel / AutoencoderKL kwargs).
    conditioner_state: the text tower in open_clip layout, i.e. FrozenOpenCLIPTextEncoder(...).text's keys.
    conditioner_config: FrozenOpenCLIPTextEncoder kwargs with a Hydra ``_target_``; ``pretrained`` is unset
        until ``write_conditioner`` puts the weights in a file.
    open_clip_model_cfg: the open_clip model config of ``conditioner_config["arch"]`` (kept so an arch that is
        not built into open_clip can be written out again).
    family: "sd1", "sd2" or "custom". prediction_type: "eps" | "v" | "x0" where the source says so, else None.
    schedule_config: NoiseSchedule kwargs where the source says (a diffusers scheduler config, or a single
        file's stored betas when they are SD's schedule), else None.
    ignored_keys: source keys that hold no weights of our models (logged when loaded).
    """

    unet: UNetModel | None = None
    unet_config: dict | None = None
    autoencoder: AutoencoderKL | None = None
    autoencoder_config: dict | None = None
    conditioner_state: dict[str, torch.Tensor] | None = None
    conditioner_config: dict | None = None
    open_clip_model_cfg: dict | None = None
    family: str = "custom"
    prediction_type: str | None = None
    schedule_config: dict | None = None
    ignored_keys: list[str] = field(default_factory=list)


@dataclass
class ConvertedWeights(_TextWeights):
    """Our configs and state dicts, converted and checked, before any module is built (same fields as
    PretrainedParts, with ``unet_state`` / ``autoencoder_state`` in place of the modules; tensors as stored,
    e.g. fp16)."""

    unet_config: dict | None = None
    unet_state: dict[str, torch.Tensor] | None = None
    autoencoder_config: dict | None = None
    autoencoder_state: dict[str, torch.Tensor] | None = None
    conditioner_config: dict | None = None
    conditioner_state: dict[str, torch.Tensor] | None = None
    open_clip_model_cfg: dict | None = None
    family: str = "custom"
    prediction_type: str | None = None
    schedule_config: dict | None = None
    ignored_keys: list[str] = field(default_factory=list)

    def build(self) -> PretrainedParts:
        return PretrainedParts(
            unet=None if self.unet_state is None else build_unet(self.unet_config, self.unet_state),
            unet_config=self.unet_config,
            autoencoder=None if self.autoencoder_state is None
            else build_autoencoder(self.autoencoder_config, self.autoencoder_state),
            autoencoder_config=self.autoencoder_config,
            conditioner_state=self.conditioner_state,
            conditioner_config=self.conditioner_config,
            open_clip_model_cfg=self.open_clip_model_cfg,
            family=self.family,
            prediction_type=self.prediction_type,
            schedule_config=self.schedule_config,
            ignored_keys=self.ignored_keys,
        )


def _build(build: Callable[[], torch.nn.Module], state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    # Built on the meta device and given the converted tensors: no random initialisation of weights that are
    # overwritten anyway (seconds and gigabytes for a full-size U-Net). Weights are made fp32 (files are often
    # fp16): trainable weights stay fp32, autocast does the rest. The models have no buffers to initialise.
    with torch.device("meta"):
        model = build()
    state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def build_unet(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> UNetModel:
    return _build(lambda: UNetModel(**config), state)


def build_autoencoder(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> AutoencoderKL:
    return _build(lambda: AutoencoderKL(**config), state)
