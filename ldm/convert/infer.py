"""Our model configs read off CompVis-layout weights, and the SD1 / SD2 presets (algorithms spec §7).

Shapes give nearly everything: channel counts, levels, blocks per level, where the transformers are, their
depth, the context width and whether proj_in is a 1×1 conv or a linear. They do not give the number of
attention heads. That follows from the family, which the weights do identify:

    SD1: context 768 (OpenAI CLIP ViT-L/14), conv proj_in   → 8 heads at every level
    SD2: context 1024 (OpenCLIP ViT-H/14), linear proj_in   → 64 channels per head

Anything else needs its heads named (``config={"unet": {...}}``, or the metadata ``save_single_file`` writes).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from ldm.convert.key_mapping import ConversionError
from ldm.presets import autoencoder_preset, unet_preset
from ldm.modules.autoencoder import LEGACY_NORM

logger = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2")

UNET_PRESETS: dict[str, dict] = {family: unet_preset(family) for family in FAMILIES}
# The KL-f8 autoencoder both families share. scale_factor is not in the weights; 0.18215 is SD's.
# CompVis' code and diffusers normalise with a fixed number of groups (32) at every width.
AUTOENCODER_PRESET = {**autoencoder_preset("kl_f8"), **LEGACY_NORM}


def _get(state: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"{what}: cannot read the architecture off the weights, key {key} is missing")
    return state[key]


def _indices(state: Mapping[str, Any], prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in state
                   if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()})


def family_of(context_dim: int, use_linear_projection: bool) -> str | None:
    if context_dim == 768 and not use_linear_projection:
        return "sd1"
    if context_dim == 1024 and use_linear_projection:
        return "sd2"
    return None


def infer_unet_structure(state: Mapping[str, torch.Tensor]) -> dict:
    """UNetModel kwargs except the heads, from a CompVis-layout U-Net state dict (no prefix)."""
    what = "U-Net"
    conv_in = _get(state, "input_blocks.0.0.weight", what)
    model_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    out_channels = int(_get(state, "out.2.weight", what).shape[0])

    levels: list[list[int]] = [[]]  # output channels of each ResBlock, per level
    attention_levels: set[int] = set()
    for i in _indices(state, "input_blocks.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in state:  # a Downsample closes the level
            levels.append([])
            continue
        levels[-1].append(int(_get(state, f"input_blocks.{i}.0.in_layers.2.weight", what).shape[0]))
        if f"input_blocks.{i}.1.proj_in.weight" in state:
            attention_levels.add(len(levels) - 1)
    counts = {len(level) for level in levels}
    if len(counts) != 1 or 0 in counts:
        raise ConversionError(f"{what}: levels have different numbers of ResBlocks {[len(level) for level in levels]}; "
                              "UNetModel needs the same num_res_blocks at every level")
    channel_mult = []
    for level in levels:
        if len(set(level)) != 1 or level[0] % model_channels:
            raise ConversionError(f"{what}: ResBlock widths {level} are not one multiple of {model_channels}")
        channel_mult.append(level[0] // model_channels)

    proj_in = _get(state, "middle_block.1.proj_in.weight", what)
    depth = len(_indices(state, "middle_block.1.transformer_blocks."))
    return dict(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=counts.pop(),
        attention_resolutions=[2**level for level in sorted(attention_levels, reverse=True)],  # CompVis order
        transformer_depth=depth,
        context_dim=int(_get(state, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", what).shape[1]),
        use_linear_projection=proj_in.ndim == 2,
    )


def infer_unet_config(state: Mapping[str, torch.Tensor]) -> tuple[dict, str]:
    """(UNetModel kwargs, family) from a CompVis-layout U-Net state dict; heads from the family."""
    config = infer_unet_structure(state)
    family = family_of(config["context_dim"], config["use_linear_projection"])
    if family is None:
        raise ConversionError(
            f"U-Net: context width {config['context_dim']} with "
            f"{'linear' if config['use_linear_projection'] else 'conv'} proj_in is neither SD1 (768, conv) nor "
            f"SD2 (1024, linear), and the number of attention heads is not stored in the weights; name the "
            f"config, e.g. config={{'unet': {{**structure, 'num_heads': H}}}} (structure read off the weights: "
            f"{config})"
        )
    preset = UNET_PRESETS[family]
    config.update(num_heads=preset["num_heads"], head_dim=preset["head_dim"])
    logger.info("U-Net: %s layout inferred from the weights (context %d, %s proj_in)", family.upper(),
                config["context_dim"], "linear" if config["use_linear_projection"] else "conv")
    return config, family


def infer_autoencoder_config(state: Mapping[str, torch.Tensor], scale_factor: float | None = None) -> dict:
    """AutoencoderKL kwargs from a CompVis-layout VAE state dict (no prefix)."""
    what = "autoencoder"
    conv_in = _get(state, "encoder.conv_in.weight", what)
    ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = _indices(state, "encoder.down.")
    if not levels:
        raise ConversionError(f"{what}: no encoder.down.N keys")
    ch_mult = []
    for level in levels:
        width = int(_get(state, f"encoder.down.{level}.block.0.conv1.weight", what).shape[0])
        if width % ch:
            raise ConversionError(f"{what}: level {level} width {width} is not a multiple of {ch}")
        ch_mult.append(width // ch)
    if scale_factor is None:
        scale_factor = AUTOENCODER_PRESET["scale_factor"]
        logger.info("autoencoder: scale_factor is not stored in the weights; using SD's %s", scale_factor)
    return dict(
        in_channels=in_channels,
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=len(_indices(state, "encoder.down.0.block.")),
        z_channels=int(_get(state, "encoder.conv_out.weight", what).shape[0]) // 2,
        embed_dim=int(_get(state, "quant_conv.weight", what).shape[0]) // 2,
        scale_factor=float(scale_factor),
        # Weights do not say how many groups a GroupNorm has: CompVis' 32 at every width; no norm weights at
        # all means an autoencoder without normalisation.
        **(LEGACY_NORM if "encoder.norm_out.weight" in state else {**LEGACY_NORM, "norm": "none"}),
    )


def preset(name: str) -> tuple[dict, dict]:
    """(U-Net config, autoencoder config) of a named family."""
    if name not in FAMILIES:
        raise ConversionError(f"unknown config {name!r}; choose one of {FAMILIES} or pass a dict")
    return dict(UNET_PRESETS[name]), dict(AUTOENCODER_PRESET)


def unet_config_of(unet: torch.nn.Module) -> dict:
    """UNetModel kwargs of a built U-Net: structure from its weights, heads from its attention layers."""
    config = infer_unet_structure(unet.state_dict())
    layers = unet.attention_layers()
    heads = {layer.heads for layer in layers}
    head_dims = {layer.head_dim for layer in layers}
    if len(heads) == 1:
        config.update(num_heads=heads.pop(), head_dim=None)
    elif len(head_dims) == 1:
        config.update(num_heads=None, head_dim=head_dims.pop())
    else:
        raise ConversionError(f"U-Net has neither one head count {sorted(heads)} nor one head width "
                              f"{sorted(head_dims)}")
    return config


def autoencoder_config_of(autoencoder: torch.nn.Module) -> dict:
    config = infer_autoencoder_config(autoencoder.state_dict(), scale_factor=float(autoencoder.scale_factor))
    return {**config, **autoencoder.norm_config}
