"""Imported weights as the start of a stage-2 run: ``python train.py ... init_from=PATH``.

PATH is one of

    a diffusers pipeline folder          unet/ vae/ text_encoder/ scheduler/ (model_index.json)
    a Stable Diffusion single file       .safetensors / .ckpt in the CompVis layout (also ``save_single_file``'s)
    a stage-2 checkpoint of this framework (a Lightning .ckpt with the module's hyperparameters)

and gives the U-Net (architecture and weights), the autoencoder with its latent scale factor, the text
encoder and, where the source says so, the prediction type and the noise schedule. The architecture always
comes from the weights; the experiment keeps its runtime choices (attention backend, gradient checkpointing,
dropout), its data and its optimisation. A converted text encoder is written to ``RUN/pretrained/`` and
referenced from the run's config, so the run's checkpoints are loadable on their own, like any other.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ldm.convert import ConversionError, convert
from ldm.modules.lora import has_lora, merge_lora
from ldm.training.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger(__name__)

# UNetModel arguments that do not change the weights' shapes: the experiment's values are kept.
UNET_RUNTIME_KEYS = ("dropout", "gradient_checkpointing", "attention_backend")
_SINGLE_FILE_EMA_PREFIX = "model_ema."


class PretrainedInit:
    """What a stage-2 module starts from. A plain class (not a dataclass), so that Hydra passes it to the
    module untouched instead of turning it into a config.

    unet_config / unet_state: UNetModel kwargs and weights. autoencoder_config (with ``scale_factor``) /
    autoencoder_state: None when the source has no autoencoder. conditioner_config: a conditioner config with
    ``_target_`` (None: keep the experiment's); conditioner_seed / conditioner_state: the seed a random-weight
    stand-in is drawn from, and weights of a trainable conditioner, where the source has them.
    prediction_type / schedule_config: None where the source does not say. resolution: the image size the source
    model was trained at (a stage-2 checkpoint's sampling size; diffusers' U-Net sample_size × the autoencoder's
    downsampling; 512 for SD single files), the default of DreamBooth's data.resolution.
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
        self.resolution = resolution  # the image size the source was trained at (None: unknown)
        self.unet_config = dict(unet_config)
        self.unet_state = unet_state
        self.autoencoder_config = None if autoencoder_config is None else dict(autoencoder_config)
        self.autoencoder_state = autoencoder_state
        self.conditioner_config = None if conditioner_config is None else dict(conditioner_config)
        self.conditioner_seed = conditioner_seed
        self.conditioner_state = conditioner_state
        self.prediction_type = prediction_type
        self.schedule_config = None if schedule_config is None else dict(schedule_config)

    @property
    def scale_factor(self) -> float | None:
        return None if self.autoencoder_config is None else self.autoencoder_config.get("scale_factor")

    def unet_kwargs(self, experiment_unet: dict) -> dict:
        """The U-Net's architecture from the weights, with the experiment's runtime choices."""
        kwargs = dict(self.unet_config)
        kwargs.update({k: experiment_unet[k] for k in UNET_RUNTIME_KEYS if k in experiment_unet})
        differs = sorted(k for k in self.unet_config if k in experiment_unet and k not in UNET_RUNTIME_KEYS
                         and experiment_unet[k] != self.unet_config[k])
        if differs:
            log.info("init_from: the U-Net architecture comes from %s (differs from the experiment's model.unet "
                     "in %s)", self.source, ", ".join(differs))
        return kwargs

    def __repr__(self) -> str:
        return f"PretrainedInit({self.source!r})"


# ------------------------------------------------------------------------------------------- sources


def native_latent_size(path: str | os.PathLike, kind: str) -> int:
    """The latent size imported weights were trained at: diffusers' U-Net ``sample_size``, else SD's 64."""
    config = Path(path) / "unet" / "config.json"
    if kind == "diffusers" and config.is_file():
        import json

        return int(json.loads(config.read_text()).get("sample_size") or 64)
    return 64


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
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
        else:
            contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            keys = list(contents.get("state_dict", contents))
    except Exception:  # unreadable here: the converter reports it properly
        return False
    return any(k.startswith(_SINGLE_FILE_EMA_PREFIX) and not k.endswith(("decay", "num_updates")) for k in keys)


def load_diffusion_module(ckpt: dict[str, Any], path: str | os.PathLike):
    """A DiffusionModule (fp32, CPU) with the weights of one of this framework's stage-2 checkpoints."""
    from ldm.training.diffusion_module import DiffusionModule

    hparams = dict(ckpt.get("hyper_parameters") or {})
    if "unet" not in hparams or "autoencoder" not in hparams:
        raise CheckpointError(f"{path} is not a stage-2 (text-to-image) checkpoint of this framework")
    hparams.pop("autoencoder_ckpt", None)
    # Training-only settings of subclasses (DreamBooth's prior_loss_weight) do not change the model.
    accepted = inspect.signature(DiffusionModule.__init__).parameters
    module = DiffusionModule(**{k: v for k, v in hparams.items() if k in accepted})
    module.on_load_checkpoint(ckpt)  # re-inserts the frozen conditioner's weights
    module.load_state_dict(ckpt["state_dict"], strict=True)
    return module.eval()


def _from_stage2(ckpt: dict[str, Any], path: Path, out_dir: Path, use_ema: bool) -> PretrainedInit:
    module = load_diffusion_module(ckpt, path)
    hparams = module.hparams
    unet = module.ema.model if (use_ema and module.ema is not None) else module.unet
    log.info("init_from %s: %s U-Net weights", path, "EMA" if unet is not module.unet else "raw")
    # Adapters of a LoRA run are folded into the weights: the new run starts from the adapted model.
    unet = merge_lora(unet) if has_lora(unet) else unet
    autoencoder_config = dict(hparams["autoencoder"], scale_factor=float(hparams["scale_factor"]))
    conditioner_config, conditioner_state = dict(hparams["conditioner"]), None
    conditioner = module.conditioner
    if not module.conditioner_frozen:
        from ldm.conditioning.text import FrozenOpenCLIPTextEncoder

        if isinstance(conditioner, FrozenOpenCLIPTextEncoder):
            # A fine-tuned text encoder: its weights go to a file the new run's config points at.
            from ldm.convert.clip_text import write_text_weights

            text = merge_lora(conditioner.text) if has_lora(conditioner.text) else conditioner.text
            config = {k: v for k, v in conditioner_config.items() if k not in ("pretrained", "cache_size")}
            conditioner_config = write_text_weights(out_dir / "text_encoder", config, text.state_dict(), None)
        else:  # a trainable conditioner of another kind (class labels): its weights go with the init
            conditioner_state = conditioner.state_dict()
    return PretrainedInit(
        source=str(path),
        unet_config=dict(hparams["unet"]),
        unet_state={k: v.detach().clone() for k, v in unet.state_dict().items()},
        autoencoder_config=autoencoder_config,
        autoencoder_state=module.autoencoder.state_dict(),
        conditioner_config=conditioner_config,
        conditioner_seed=int(hparams.get("conditioner_seed", 0)),
        conditioner_state=conditioner_state,
        prediction_type=hparams["prediction_type"],
        schedule_config=dict(hparams["schedule"]),
        resolution=(hparams.get("sampling") or {}).get("image_size"),
    )


def load_init_weights(path: str | os.PathLike, out_dir: str | os.PathLike, use_ema: bool = True) -> PretrainedInit:
    """Reads PATH (see the module docstring); a converted text encoder is written under ``out_dir``.

    use_ema: take the EMA U-Net where the source has one (our checkpoints; single files with model_ema.*).
    """
    path = Path(path).expanduser()
    out_dir = Path(out_dir)
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank > 0:
        # Every rank of a multi-process run converts; each writes its own copy, so that none reads a file another
        # is writing. Checkpoints (saved by rank 0) point at rank 0's.
        out_dir = out_dir / f"rank{rank_zero_only.rank}"
    kind, ckpt = source_kind(path)
    if kind == "stage2":
        return _from_stage2(ckpt, path, out_dir, use_ema)
    ema = use_ema and kind == "single_file" and single_file_has_ema(path)
    converted = convert(path, kind=kind, ema=ema)
    if converted.unet_state is None:
        raise ConversionError(f"init_from {path} holds no U-Net")
    conditioner_config = None
    if converted.conditioner_state is not None:
        conditioner_config = converted.write_conditioner(out_dir / "text_encoder")
    log.info("init_from %s (%s, %s): U-Net%s%s; prediction type %s", path, kind, converted.family,
             "" if converted.autoencoder_state is None else ", autoencoder",
             "" if conditioner_config is None else ", text encoder",
             converted.prediction_type or "not stored (the experiment's is used)")
    return PretrainedInit(
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
