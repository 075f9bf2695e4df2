"""What a conversion produces, and the strict key-for-key remapping every converter goes through.

A conversion is a *plan*: for every key of our model, the source key(s) it is made from. Applying a plan is
strict in three ways, so that no weight is ever silently dropped or invented:

    missing     a source key the plan needs is not in the file         → ConversionError listing them
    unexpected  a key of the file that no plan uses and that is not     → ConversionError listing them
                on the short list of known non-weights (schedule
                buffers, EMA bookkeeping, ...)
    shape       a converted tensor does not fit our architecture        → ConversionError listing them
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.unet import UNetModel
from ldm.weights_io import describe_load_error, refers_to_code

logger = logging.getLogger(__name__)

TEXT_ENCODER_TARGET = "ldm.conditioning.text.FrozenOpenCLIPTextEncoder"
# How many keys an error message names before it summarises the rest.
_MAX_LISTED = 40


class ConversionError(ValueError):
    """Weights that do not map onto our models: missing, unmapped or misshapen keys, or an unreadable file."""


def format_keys(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


@dataclass(frozen=True)
class KeySource:
    """Where one of our tensors comes from.

    options: alternative key tuples, tried in order; the first whose keys are all present is used (older
        diffusers files name the VAE attention ``query/key/value/proj_attn``, newer ones ``to_q/...``).
        Several keys in one tuple are concatenated along dim 0 (q, k, v → open_clip's in_proj_weight).
    reshape: the tensor may change shape at equal size (a 1×1 conv weight (C, C, 1, 1) ↔ a linear (C, C)).
    """

    options: tuple[tuple[str, ...], ...]
    reshape: bool = False

    @staticmethod
    def one(key: str, reshape: bool = False) -> "KeySource":
        return KeySource(((key,),), reshape)

    def resolve(self, source: Mapping[str, Any]) -> tuple[str, ...] | None:
        for keys in self.options:
            if all(k in source for k in keys):
                return keys
        return None


Plan = dict[str, KeySource]  # our key → where it comes from


def missing_keys(source: Mapping[str, Any], plan: Plan) -> list[str]:
    return sorted(k for s in plan.values() if s.resolve(source) is None for k in s.options[0] if k not in source)


def used_keys(source: Mapping[str, Any], plan: Plan) -> set[str]:
    used: set[str] = set()
    for s in plan.values():
        keys = s.resolve(source)
        if keys:
            used.update(keys)
    return used


def check_keys(
    source: Mapping[str, Any],
    plans: Mapping[str, Plan],
    what: str,
    ignorable: Callable[[str], bool] = lambda key: False,
) -> list[str]:
    """Raises if a plan needs a key the source lacks, or the source has a key no plan uses.

    Returns the keys that were left out because ``ignorable`` says they hold no weights of our models; the
    caller logs them, so even those are never dropped silently.
    """
    problems = []
    for part, plan in plans.items():
        missing = missing_keys(source, plan)
        if missing:
            problems.append(f"{len(missing)} {part} keys missing: {format_keys(missing)}")
    used = set().union(*(used_keys(source, plan) for plan in plans.values())) if plans else set()
    unused = [k for k in source if k not in used]
    ignored = [k for k in unused if ignorable(k)]
    unexpected = [k for k in unused if not ignorable(k)]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys that map onto no part of our models: "
                        f"{format_keys(unexpected)}")
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))
    return sorted(ignored)


def apply_plan(
    source: Mapping[str, torch.Tensor], plan: Plan, expected: Mapping[str, torch.Size], what: str
) -> dict[str, torch.Tensor]:
    """Builds our state dict from the source; every tensor must have the shape our architecture expects."""
    if set(plan) != set(expected):
        # A plan is made from the model's own key list; a difference is a bug in the converter itself.
        raise ConversionError(f"{what}: plan and model disagree on keys: "
                              f"{format_keys(set(plan).symmetric_difference(expected))}")
    state: dict[str, torch.Tensor] = {}
    mismatched = []
    for key, src in plan.items():
        keys = src.resolve(source)
        if keys is None:
            raise ConversionError(f"{what}: missing {format_keys(src.options[0])}")
        tensor = source[keys[0]] if len(keys) == 1 else torch.cat([source[k] for k in keys], dim=0)
        shape = torch.Size(expected[key])
        if tensor.shape != shape and src.reshape and tensor.numel() == shape.numel():
            tensor = tensor.reshape(shape)
        if tensor.shape != shape:
            mismatched.append(f"{key} (from {'+'.join(keys)}): expected {tuple(shape)}, got {tuple(tensor.shape)}")
        state[key] = tensor
    if mismatched:
        shown = "; ".join(mismatched[:_MAX_LISTED])
        more = f"; ... and {len(mismatched) - _MAX_LISTED} more" if len(mismatched) > _MAX_LISTED else ""
        raise ConversionError(
            f"{what}: the weights do not fit the architecture ({len(mismatched)} shape mismatches): {shown}{more}"
        )
    return state


def expected_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, torch.Size]:
    """Parameter shapes of a model, built on the meta device: no memory, no initialisation cost."""
    with torch.device("meta"):
        model = build()
    return {k: v.shape for k, v in model.state_dict().items()}


def unet_shapes(config: Mapping[str, Any]) -> dict[str, torch.Size]:
    return expected_shapes(lambda: UNetModel(**config))


def autoencoder_shapes(config: Mapping[str, Any]) -> dict[str, torch.Size]:
    return expected_shapes(lambda: AutoencoderKL(**config))


def log_ignored(ignored: list[str], what: str) -> None:
    if ignored:
        logger.info("%s: %d keys hold no weights of our models and were left out: %s", what, len(ignored),
                    format_keys(ignored))


class _TextWeights:
    """Text encoder helpers shared by converted weights and built parts."""

    conditioner_state: dict[str, torch.Tensor] | None
    conditioner_config: dict | None
    open_clip_model_cfg: dict | None

    def build_conditioner(self, **overrides: Any):
        """A FrozenOpenCLIPTextEncoder with the converted weights; ``overrides`` change its kwargs."""
        from ldm.convert.clip_text import conditioner_from_state

        if self.conditioner_state is None or self.conditioner_config is None:
            raise ConversionError("these pretrained parts have no text encoder")
        return conditioner_from_state({**self.conditioner_config, **overrides}, self.conditioner_state)

    def write_conditioner(self, directory: str | os.PathLike) -> dict:
        """Writes the text weights to ``directory`` and returns a conditioner config that loads them.

        The config has ``pretrained`` set to the weights file, so it can be instantiated in any process
        (training, sampling), as any other conditioner config is.
        """
        from ldm.convert.clip_text import write_text_weights

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


def read_state_file(path: str | os.PathLike, what: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(contents, safetensors metadata) of a weights file. Pickles load with weights_only=True only."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    try:
        # weights_only: tensors and plain containers only. A pickle that would build other objects (and so
        # could run code) is refused by torch before anything in it is executed.
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # code in the pickle, truncated files, zip errors, bytes of another format
        if refers_to_code(e):
            raise ConversionError(
                f"{what} {path}: refused to unpickle: the file holds Python objects other than tensors and plain "
                f"containers, which could run code on load ({describe_load_error(e)}). Only weights_only pickles "
                "and .safetensors files are read; convert it to .safetensors with a tool you trust."
            ) from e
        raise ConversionError(f"{what} {path} is not a readable checkpoint: not a torch file or .safetensors, or "
                              f"cut short ({describe_load_error(e)})") from e
    if not isinstance(contents, dict):
        raise ConversionError(f"{what} {path}: expected a dict of tensors, got {type(contents).__name__}")
    return contents, {}


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


def scratch_dir(prefix: str) -> str:
    """A directory that lives as long as the process (for open_clip archs built from converted configs)."""
    return tempfile.mkdtemp(prefix=prefix)
