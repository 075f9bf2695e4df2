"""LatentDiffusion models from files, and to files.

    load_source(path)     a model to sample from: a stage-2 checkpoint of this framework, its export, a diffusers
                          folder, a Stable Diffusion single file
    read_source(path)     what a run started from those files (``init_from``) takes: SourceWeights
    write_export(model)   inference-only weights (``python -m ldm.export``): one .safetensors with the settings
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.convert import ConversionError, convert
from ldm.convert.clip_text import write_text_weights
from ldm.diffusion.schedule import NoiseSchedule
from ldm.model_parts import SourceWeights, native_latent_size, single_file_has_ema, source_kind
from ldm.modules.lora import has_lora, merge_lora
from ldm.weights_io import CheckpointError

log = logging.getLogger(__name__)

EXPORT_FORMAT = "ldm-export-v1"
EXPORT_WEIGHTS = "model.safetensors"


def load_source(cls, path: str | os.PathLike, use_ema: bool = True):
    """See LatentDiffusion.from_source."""
    if export_weights_path(path) is not None:  # inference-only weights written by `python -m ldm.export`
        return cls.from_checkpoint(load_export(path), use_ema=use_ema, source=str(path))
    kind, ckpt = source_kind(path, "checkpoint")
    if kind == "stage2":
        return cls.from_checkpoint(ckpt, use_ema=use_ema, source=str(path))
    return _load_imported(cls, Path(path).expanduser(), kind, use_ema)


def _load_imported(cls, path: Path, kind: str, use_ema: bool):
    """Imported weights (ldm.convert). The prediction type and schedule come from the source where it says
    (diffusers' scheduler config), else SD's (eps, scaled_linear). The sampling size: the U-Net's sample_size
    (diffusers) times the autoencoder's downsampling, else 64 latents (512 px for SD1/SD2)."""
    converted = convert(path, kind=kind, ema=use_ema and kind == "single_file" and single_file_has_ema(path))
    lacking = [name for name, state in (("U-Net", converted.unet_state), ("autoencoder", converted.autoencoder_state),
                                        ("text encoder", converted.conditioner_state)) if state is None]
    if lacking:
        raise ConversionError(f"{path} has no {', '.join(lacking)}; sampling needs the U-Net, the autoencoder "
                              "and the text encoder")
    parts = converted.build()
    schedule = dict(parts.schedule_config or {})
    image_size = native_latent_size(path, kind) * parts.autoencoder.downsampling_factor
    config = dict(unet=dict(parts.unet_config), autoencoder=dict(parts.autoencoder_config), schedule=schedule,
                  conditioner=dict(parts.conditioner_config), conditioner_seed=0,
                  prediction_type=parts.prediction_type or "eps", scale_factor=parts.autoencoder.scale_factor,
                  autoencoder_precision="fp32")
    return cls(parts.unet, parts.autoencoder, parts.build_conditioner(), NoiseSchedule(**schedule),
               parts.prediction_type or "eps", parts.autoencoder.scale_factor, config=config,
               sampling={"image_size": image_size})


def read_source(cls, path: str | os.PathLike, out_dir: str | os.PathLike, use_ema: bool = True) -> SourceWeights:
    """Reads what a run starts from (``init_from=PATH``). A converted or fine-tuned text encoder is written under
    ``out_dir`` (each process of a multi-process run its own) and the run's config points at it, so the run's
    checkpoints load like any other. use_ema: the source's EMA U-Net where it has one (our checkpoints; single
    files with model_ema.*)."""
    path = Path(path).expanduser()
    out_dir = Path(out_dir)
    kind, ckpt = source_kind(path)
    if kind == "stage2":
        return _read_stage2(cls, ckpt, path, out_dir, use_ema)
    converted = convert(path, kind=kind, ema=use_ema and kind == "single_file" and single_file_has_ema(path))
    if converted.unet_state is None:
        raise ConversionError(f"init_from {path} holds no U-Net")
    conditioner_config = None
    if converted.conditioner_state is not None:
        conditioner_config = converted.write_conditioner(out_dir / "text_encoder")
    log.info("init_from %s (%s, %s): U-Net%s%s; prediction type %s", path, kind, converted.family,
             "" if converted.autoencoder_state is None else ", autoencoder",
             "" if conditioner_config is None else ", text encoder",
             converted.prediction_type or "not stored (the experiment's is used)")
    return SourceWeights(
        source=str(path),
        unet_config=converted.unet_config,
        unet_state=converted.unet_state,
        autoencoder_config=converted.autoencoder_config,
        autoencoder_state=converted.autoencoder_state,
        conditioner_config=conditioner_config,
        prediction_type=converted.prediction_type,
        schedule_config=converted.schedule_config,
        resolution=None if converted.autoencoder_config is None else
        native_latent_size(path, kind) * 2 ** (len(converted.autoencoder_config["ch_mult"]) - 1),
    )


def _read_stage2(cls, ckpt: dict[str, Any], path: Path, out_dir: Path, use_ema: bool) -> SourceWeights:
    model = cls.from_checkpoint(ckpt, use_ema=use_ema, source=str(path))
    log.info("init_from %s: %s U-Net weights", path, "EMA" if model.used_ema else "raw")
    # Adapters of a LoRA run are folded into the weights: the new run starts from the adapted model.
    unet = merge_lora(model.unet) if has_lora(model.unet) else model.unet
    config = model.config()
    conditioner_config, conditioner_state = dict(config["conditioner"]), None
    conditioner = model.conditioner
    if not model.conditioner_frozen:
        text = getattr(conditioner, "text", None)
        if text is not None:
            # A fine-tuned text encoder: its weights go to a file the new run's config points at.
            text = merge_lora(text) if has_lora(text) else text
            settings = {k: v for k, v in conditioner_config.items() if k not in ("pretrained", "cache_size")}
            conditioner_config = write_text_weights(out_dir / "text_encoder", settings, text.state_dict(), None)
        else:  # a trainable conditioner of another kind (class labels): its weights go with the init
            conditioner_state = conditioner.state_dict()
    return SourceWeights(
        source=str(path),
        unet_config=dict(config["unet"]),
        unet_state={k: v.detach().clone() for k, v in unet.state_dict().items()},
        autoencoder_config=dict(config["autoencoder"], scale_factor=model.scale_factor),
        autoencoder_state=model.autoencoder.state_dict(),
        conditioner_config=conditioner_config,
        conditioner_seed=int(config.get("conditioner_seed", 0)),
        conditioner_state=conditioner_state,
        prediction_type=model.prediction_type,
        schedule_config=dict(config["schedule"]),
        resolution=model.image_size,
    )


# -- exports ------------------------------------------------------------------------------------------------------


def export_weights_path(path: str | os.PathLike) -> Path | None:
    """The weights file if ``path`` is an export (its folder or its model.safetensors), else None."""
    path = Path(path).expanduser()
    candidate = path / EXPORT_WEIGHTS if path.is_dir() else path
    if candidate.suffix != ".safetensors" or not candidate.is_file():
        return None
    try:
        with safe_open(str(candidate), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # noqa: BLE001 - not a safetensors file: not an export
        return None
    return candidate if metadata.get("format") == EXPORT_FORMAT else None


def load_export(path: str | os.PathLike) -> dict[str, Any]:
    """An export as a checkpoint-like dict: {"state_dict", "hyper_parameters"} (float32 weights)."""
    weights = export_weights_path(path)
    if weights is None:
        raise CheckpointError(f"{path} is not an export of this framework (python -m ldm.export)")
    with safe_open(str(weights), framework="pt") as f:
        hparams = json.loads(f.metadata()["hyper_parameters"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    return {"state_dict": state, "hyper_parameters": hparams}


def write_export(weights: dict[str, torch.Tensor], hparams: dict, path: Path, metadata: dict[str, str]) -> None:
    """model.safetensors holding ``weights``, with the settings as JSON in its metadata, written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(weights, str(tmp), metadata={"format": EXPORT_FORMAT, "hyper_parameters": json.dumps(hparams),
                                           **metadata})
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # safetensors creates the file private; an export is meant to be shared
    tmp.replace(path)
