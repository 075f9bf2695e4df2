"""The original single-file layout (CompVis / Stability AI .ckpt or .safetensors) ↔ our models.

One state dict holds the whole LatentDiffusion module:

    model.diffusion_model.*                    the U-Net (our UNetModel keys, verbatim)
    first_stage_model.*                        the KL autoencoder (our AutoencoderKL keys, verbatim)
    cond_stage_model.transformer.text_model.*  SD1: OpenAI CLIP ViT-L/14 text model, Hugging Face layout
    cond_stage_model.model.*                   SD2: OpenCLIP ViT-H/14 text tower, open_clip layout
    model_ema.*                                the EMA U-Net, module path without dots
                                               ("model_ema.diffusion_modelinput_blocks00weight")

These are the prefixes diffusers' ``single_file_utils`` reads (LDM_UNET_KEY, LDM_VAE_KEYS,
LDM_CLIP_PREFIX_TO_REMOVE, convert_open_clip_checkpoint's prefix). Besides weights, the files carry the DDPM
schedule as buffers and EMA bookkeeping; those are the only keys left out, and they are logged.

Files written by ``save_single_file`` also carry our configs (safetensors metadata, or an "ldm_config" entry
of a .ckpt), so models whose heads or text arch the weights cannot reveal load back exactly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from ldm.convert.clip_text import (
    SD1_CONDITIONER,
    SD2_CONDITIONER,
    TEXT_ENCODER_TARGET,
    hf_ignorable,
    hf_plan,
    model_cfg_of,
    normalized_text_cfg,
    open_clip_plan,
    open_clip_to_hf,
    resolve_arch,
    text_cfg_from_state,
    text_shapes,
)
from ldm.convert.infer import (
    autoencoder_config_of,
    family_of,
    infer_autoencoder_config,
    infer_unet_config,
    unet_config_of,
)
from ldm.convert.key_mapping import (
    ConversionError,
    KeySource,
    Plan,
    apply_plan,
    check_keys,
    log_ignored,
    read_state_file,
)
from ldm.convert.parts import ConvertedWeights, autoencoder_shapes, unet_shapes
from ldm.diffusion.schedule import NoiseSchedule
from ldm.modules.autoencoder import saved_config

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
HF_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_TEXT_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
METADATA_KEY = "ldm_config"

# The DDPM schedule LatentDiffusion registers as buffers: recomputed from the schedule config, not weights.
_SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
})
_EMA_BOOKKEEPING = frozenset({"model_ema.decay", "model_ema.num_updates"})
# Parts of an open_clip CLIP that are not the per-token text features: the pooled projection, the
# contrastive temperature, the (recomputed) causal mask and, in full CLIP files, the image tower.
_OPEN_CLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")


def ema_key(unet_key: str) -> str:
    """Where CompVis' LitEma keeps the EMA copy of a U-Net weight (dots removed from the module path)."""
    return EMA_PREFIX + "diffusion_model" + unet_key.replace(".", "")


def _ignorable(use_ema: bool):
    def ignorable(key: str) -> bool:
        if key in _SCHEDULE_BUFFERS or key in _EMA_BOOKKEEPING:
            return True
        if key.startswith(EMA_PREFIX) and not use_ema:
            return True  # the EMA copy when the raw weights are loaded
        if key.startswith(UNET_PREFIX) and use_ema:
            return True  # the raw weights when the EMA copy is loaded
        if key.startswith(VAE_PREFIX + "loss."):
            return True  # LPIPS and discriminator of the autoencoder's training loss
        if key.startswith(OPEN_CLIP_TEXT_PREFIX):
            rest = key[len(OPEN_CLIP_TEXT_PREFIX):]
            return rest in _OPEN_CLIP_UNUSED or rest.startswith("visual.")
        return hf_ignorable(HF_TEXT_PREFIX)(key)

    return ignorable


# ------------------------------------------------------------------------------------------- reading


def read_single_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, our stored configs or {}) of a single-file checkpoint."""
    contents, metadata = read_state_file(path, "checkpoint")
    stored = metadata.get(METADATA_KEY) or contents.get(METADATA_KEY)
    if isinstance(contents.get("state_dict"), dict):
        contents = contents["state_dict"]  # CompVis / Lightning .ckpt: {"state_dict": ..., "global_step": ...}
    state = {k: v for k, v in contents.items() if k != METADATA_KEY}
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ConversionError(f"{path}: entries that are not tensors: {not_tensors[:20]}")
    return state, json.loads(stored) if stored else {}


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _text_config(layout: str, text_cfg: dict, explicit: Mapping[str, Any] | None,
                 stored: Mapping[str, Any]) -> tuple[dict, dict, str]:
    """(conditioner config, open_clip model cfg, family) of the text tower in a single file."""
    if explicit is not None:
        config = {"_target_": TEXT_ENCODER_TARGET, **explicit}
        return config, model_cfg_of(config["arch"]), "custom"
    if stored.get("conditioner"):
        model_cfg = stored.get("open_clip_model_cfg")
        config = dict(stored["conditioner"])
        config["arch"] = resolve_arch(config, model_cfg)
        return config, model_cfg or model_cfg_of(config["arch"]), "custom"
    # Bare files: the heads and the activation are not in the weights; they follow from the family.
    defaults = SD1_CONDITIONER if layout == "hf" else SD2_CONDITIONER
    model_cfg = model_cfg_of(defaults["arch"])
    expected = normalized_text_cfg(model_cfg["text_cfg"])
    if normalized_text_cfg({**text_cfg, "heads": expected["heads"]}) != expected:
        family = "SD1 (OpenAI CLIP ViT-L/14, HF layout)" if layout == "hf" else "SD2 (OpenCLIP ViT-H/14)"
        raise ConversionError(
            f"the text tower ({text_cfg}) is not the {family} one, and its heads and activation are not stored "
            f"in the weights; name it: config={{'conditioner': {{'arch': ..., 'layer': ..., ...}}}}"
        )
    return {"_target_": TEXT_ENCODER_TARGET, **defaults}, model_cfg, "sd1" if layout == "hf" else "sd2"


def convert_single_file(
    path: str | os.PathLike,
    explicit: Mapping[str, Any] | None = None,
    ema: bool = False,
) -> ConvertedWeights:
    """Converts a single-file checkpoint. ``explicit`` part configs replace stored or inferred ones;
    ``ema`` loads the EMA copy of the U-Net (model_ema.*) instead of the raw weights."""
    explicit = dict(explicit or {})
    source, stored = read_single_file(path)
    what = str(path)
    out = ConvertedWeights(prediction_type=stored.get("prediction_type"))
    plans: dict[str, Plan] = {}
    shapes: dict[str, dict[str, torch.Size]] = {}

    unet_state = _strip(source, UNET_PREFIX)
    if unet_state:
        if explicit.get("unet"):
            out.unet_config = dict(explicit["unet"])
        elif stored.get("unet"):
            out.unet_config = dict(stored["unet"])
        else:
            out.unet_config, _ = infer_unet_config(unet_state)
        out.family = family_of(out.unet_config["context_dim"], out.unet_config["use_linear_projection"]) or "custom"
        shapes["U-Net"] = unet_shapes(out.unet_config)
        if ema:
            if not any(k.startswith(EMA_PREFIX) and k not in _EMA_BOOKKEEPING for k in source):
                raise ConversionError(f"{path}: ema=True but the file has no EMA weights ({EMA_PREFIX}*)")
            plans["U-Net"] = {k: KeySource.one(ema_key(k)) for k in shapes["U-Net"]}
        else:
            plans["U-Net"] = {k: KeySource.one(UNET_PREFIX + k) for k in shapes["U-Net"]}
            if any(k.startswith(EMA_PREFIX) and k not in _EMA_BOOKKEEPING for k in source):
                logger.info("%s: has EMA weights too; loading the raw ones (ema=True loads the EMA copy)", path)

    if any(k.startswith(VAE_PREFIX) and not k.startswith(VAE_PREFIX + "loss.") for k in source):
        vae_state = _strip(source, VAE_PREFIX)
        saved = stored.get("autoencoder")
        out.autoencoder_config = dict(explicit.get("autoencoder") or (saved and saved_config(saved))
                                      or infer_autoencoder_config(vae_state))
        shapes["autoencoder"] = autoencoder_shapes(out.autoencoder_config)
        plans["autoencoder"] = {k: KeySource.one(VAE_PREFIX + k) for k in shapes["autoencoder"]}

    has_hf = any(k.startswith(HF_TEXT_PREFIX) for k in source)
    has_open_clip = any(k.startswith(OPEN_CLIP_TEXT_PREFIX) for k in source)
    if has_hf and has_open_clip:
        raise ConversionError(f"{path}: holds both an HF-layout and an open_clip-layout text encoder")
    if has_hf or has_open_clip:
        layout = "hf" if has_hf else "open_clip"
        if has_hf:
            layers = sum(1 for k in source if k.startswith(HF_TEXT_PREFIX + "encoder.layers.")
                         and k.endswith(".layer_norm1.weight"))
            found_cfg = text_cfg_from_state(source, hf_plan(layers, HF_TEXT_PREFIX))
        else:
            found_cfg = text_cfg_from_state(_strip(source, OPEN_CLIP_TEXT_PREFIX))
        config, model_cfg, text_family = _text_config(layout, found_cfg, explicit.get("conditioner"), stored)
        if out.family == "custom" and text_family != "custom":
            out.family = text_family
        out.conditioner_config, out.open_clip_model_cfg = config, model_cfg
        shapes["text encoder"] = text_shapes(model_cfg["text_cfg"])
        plans["text encoder"] = (hf_plan(int(model_cfg["text_cfg"]["layers"]), HF_TEXT_PREFIX) if has_hf
                                 else open_clip_plan(shapes["text encoder"], OPEN_CLIP_TEXT_PREFIX))

    if not plans:
        raise ConversionError(f"{path}: no {UNET_PREFIX}, {VAE_PREFIX} or cond_stage_model.* keys; "
                              "not a Stable Diffusion single-file checkpoint")
    out.ignored_keys = check_keys(source, plans, what, _ignorable(ema))
    log_ignored(out.ignored_keys, what)
    states = {part: apply_plan(source, plan, shapes[part], f"{what} ({part})") for part, plan in plans.items()}
    out.unet_state = states.get("U-Net")
    out.autoencoder_state = states.get("autoencoder")
    out.conditioner_state = states.get("text encoder")
    out.schedule_config = _schedule_of(source)
    if out.prediction_type is None and out.unet_state is not None:
        logger.info("%s: the prediction type is not stored in single files (SD2 768-v models predict v, the "
                    "others eps); set it in the diffusion config", path)
    logger.info("%s converted (%s): parts %s", path, out.family, sorted(plans))
    return out


def _schedule_of(source: Mapping[str, torch.Tensor]) -> dict | None:
    """SD's schedule (NoiseSchedule's defaults) if the stored betas are that schedule, else None."""
    betas = source.get("betas")
    if betas is None:
        return None
    sd = NoiseSchedule(num_timesteps=int(betas.shape[0]))
    if torch.allclose(betas.double(), sd.betas.double(), rtol=1e-4, atol=1e-8):
        return dict(beta_schedule=sd.beta_schedule, num_timesteps=sd.num_timesteps,
                    linear_start=sd.linear_start, linear_end=sd.linear_end)
    logger.info("stored betas are not SD's scaled_linear(0.00085, 0.012) schedule; schedule not set")
    return None


# ------------------------------------------------------------------------------------------- writing


def save_single_file(
    path: str | os.PathLike,
    unet: torch.nn.Module | None = None,
    autoencoder: torch.nn.Module | None = None,
    conditioner: torch.nn.Module | None = None,
    *,
    text_layout: str = "auto",
    unet_config: Mapping[str, Any] | None = None,
    autoencoder_config: Mapping[str, Any] | None = None,
    prediction_type: str | None = None,
) -> None:
    """Writes our models as one CompVis-layout checkpoint (.safetensors, or a weights-only .ckpt).

    conditioner: a FrozenOpenCLIPTextEncoder. text_layout: "hf" stores it as SD1 does (HF CLIPTextModel keys
        under cond_stage_model.transformer.), "open_clip" as SD2 does (cond_stage_model.model.); "auto" picks
        "hf" for layer="last" (SD1's choice) and "open_clip" otherwise.
    unet_config / autoencoder_config: stored as metadata; read off the modules when not given.
    """
    path = Path(path)
    if text_layout not in ("auto", "hf", "open_clip"):
        raise ValueError(f"text_layout must be 'auto', 'hf' or 'open_clip', got {text_layout!r}")
    state: dict[str, torch.Tensor] = {}
    stored: dict[str, Any] = {"format": 1}
    if prediction_type is not None:
        stored["prediction_type"] = prediction_type
    if unet is not None:
        state.update({UNET_PREFIX + k: v for k, v in unet.state_dict().items()})
        stored["unet"] = dict(unet_config or unet_config_of(unet))
    if autoencoder is not None:
        state.update({VAE_PREFIX + k: v for k, v in autoencoder.state_dict().items()})
        stored["autoencoder"] = dict(autoencoder_config or autoencoder_config_of(autoencoder))
    if conditioner is not None:
        text_state = conditioner.text.state_dict()
        if text_layout == "auto":
            text_layout = "hf" if conditioner.layer == "last" else "open_clip"
        if text_layout == "hf":
            state.update({"cond_stage_model.transformer." + k: v for k, v in open_clip_to_hf(text_state).items()})
        else:
            state.update({OPEN_CLIP_TEXT_PREFIX + k: v for k, v in text_state.items()})
        stored["conditioner"] = {
            "_target_": TEXT_ENCODER_TARGET, "arch": conditioner.arch, "layer": conditioner.layer,
            "final_norm": conditioner.final_norm, "pad_token": conditioner.pad_token,
            "use_mask": conditioner.use_mask, "max_chunks": conditioner.max_chunks,
        }
        stored["open_clip_model_cfg"] = model_cfg_of(conditioner.arch)
    if not state:
        raise ValueError("save_single_file: nothing to save (pass unet, autoencoder and/or conditioner)")
    # Own, contiguous CPU copies: safetensors refuses shared or strided storage.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(stored)})
    else:
        torch.save({"state_dict": state, METADATA_KEY: json.dumps(stored)}, tmp)
    os.replace(tmp, path)  # atomic: never a half-written checkpoint under the real name
    logger.info("wrote %d tensors to %s", len(state), path)
