"""A diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, each with config.json and weights) → our models.

The key mapping is written out here rather than imported, so diffusers is never needed at run time. It is
the inverse of diffusers' single-file converters, expressed key by key from *our* names:

    U-Net (L = layers_per_block; input block i ≥ 1 is level b = (i-1)//(L+1), slot j = (i-1)%(L+1))
    time_embed.0 / .2                     time_embedding.linear_1 / linear_2
    input_blocks.0.0                      conv_in
    input_blocks.i.0.op                   down_blocks.b.downsamplers.0.conv       (slot j == L)
    input_blocks.i.0 / .1                 down_blocks.b.resnets.j / attentions.j
    middle_block.0 / .1 / .2              mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.i.0 / .1                up_blocks.b.resnets.j / attentions.j    (b = i//(L+1), j = i%(L+1))
    output_blocks.i.{1,2}.conv            up_blocks.b.upsamplers.0.conv
    out.0 / out.2                         conv_norm_out / conv_out
    inside ResBlocks: in_layers.0 norm1, in_layers.2 conv1, out_layers.0 norm2, out_layers.3 conv2,
    emb_layers.1 time_emb_proj, skip_connection conv_shortcut; inside transformers the names are equal.

    VAE (N levels): encoder.down.i.block.j → encoder.down_blocks.i.resnets.j; decoder.up.b →
    decoder.up_blocks.(N-1-b) (the CompVis decoder is indexed by resolution, diffusers' by order of use);
    mid.block_k → mid_block.resnets.(k-1); mid.attn_1.{norm,q,k,v,proj_out} → mid_block.attentions.0.
    {group_norm,to_q,to_k,to_v,to_out.0} (older files: query,key,value,proj_attn), 1×1 convs ↔ linears;
    nin_shortcut → conv_shortcut; norm_out → conv_norm_out.

diffusers' quirk: a UNet config's ``attention_head_dim`` is the number of heads per level (unless
``num_attention_heads`` is set). SD1 says 8 (8 heads everywhere: our num_heads=8); SD2 says [5, 10, 20, 20]
for widths [320, 640, 1280, 1280], i.e. 64 channels per head (our head_dim=64).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.convert.clip_text import (
    SD2_CONDITIONER,
    TEXT_ENCODER_TARGET,
    hf_to_open_clip,
    model_cfg_of,
    open_clip_arch_for,
    pad_blocks,
    text_cfg_from_hf_config,
)
from ldm.convert.infer import family_of
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

logger = logging.getLogger(__name__)

_UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.fp16.bin")
_TEXT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "model.fp16.safetensors",
                 "pytorch_model.bin", "pytorch_model.fp16.bin")
_RESNET_NAMES = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "emb_layers.1.": "time_emb_proj.",
    "skip_connection.": "conv_shortcut.",
}
# Config values our modules implement; anything else in a config.json is an architecture we do not build.
_UNET_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "downsample_padding": 1, "mid_block_scale_factor": 1,
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None, "projection_class_embeddings_input_dim": None,
    "addition_time_embed_dim": None,
}
_VAE_FIXED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
              "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None, "latents_std": None}
_PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


# ------------------------------------------------------------------------------------------- key names


def _resnet(rest: str) -> str:
    for ours, theirs in _RESNET_NAMES.items():
        if rest.startswith(ours):
            return theirs + rest[len(ours):]
    raise ConversionError(f"no diffusers name for ResBlock parameter {rest}")


def unet_key_to_diffusers(key: str, layers_per_block: int) -> str:
    """Our (CompVis) U-Net key → the diffusers UNet2DConditionModel key."""
    fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
    for ours, theirs in fixed.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    per_level = layers_per_block + 1
    if key.startswith("middle_block."):
        _, k, rest = key.split(".", 2)
        if k == "1":
            return f"mid_block.attentions.0.{rest}"
        if k in ("0", "2"):
            return f"mid_block.resnets.{int(k) // 2}.{_resnet(rest)}"
    group, i, k, rest = key.split(".", 3)
    i = int(i)
    if group == "input_blocks":
        level, slot = (i - 1) // per_level, (i - 1) % per_level
        if k == "0" and rest.startswith("op."):
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}"
        if k == "0":
            return f"down_blocks.{level}.resnets.{slot}.{_resnet(rest)}"
        if k == "1":
            return f"down_blocks.{level}.attentions.{slot}.{rest}"
    if group == "output_blocks":
        level, slot = i // per_level, i % per_level
        if k == "0":
            return f"up_blocks.{level}.resnets.{slot}.{_resnet(rest)}"
        if rest.startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        if k == "1":
            return f"up_blocks.{level}.attentions.{slot}.{rest}"
    raise ConversionError(f"no diffusers name for U-Net key {key}")


def unet_plan(keys: Any, layers_per_block: int) -> Plan:
    return {k: KeySource.one(unet_key_to_diffusers(k, layers_per_block)) for k in keys}


_VAE_ATTENTION = {  # ours → (current diffusers name, pre-0.14 diffusers name)
    "norm.": ("group_norm.", "group_norm."),
    "q.": ("to_q.", "query."),
    "k.": ("to_k.", "key."),
    "v.": ("to_v.", "value."),
    "proj_out.": ("to_out.0.", "proj_attn."),
}


def vae_key_source(key: str, num_levels: int) -> KeySource:
    """Our (CompVis) VAE key → where it is in a diffusers AutoencoderKL state dict."""
    side, rest = key.split(".", 1) if key.startswith(("encoder.", "decoder.")) else ("", key)
    if not side:
        return KeySource.one(key)  # quant_conv, post_quant_conv
    if rest.startswith("norm_out."):
        return KeySource.one(f"{side}.conv_norm_out.{rest[len('norm_out.'):]}")
    parts = rest.split(".")
    if parts[0] == "mid" and parts[1].startswith("block_"):
        k = int(parts[1][len("block_"):])
        tail = ".".join(parts[2:]).replace("nin_shortcut.", "conv_shortcut.")
        return KeySource.one(f"{side}.mid_block.resnets.{k - 1}.{tail}")
    if parts[0] == "mid" and parts[1] == "attn_1":
        tail = ".".join(parts[2:])
        for ours, names in _VAE_ATTENTION.items():
            if tail.startswith(ours):
                p = tail[len(ours):]
                options = tuple(dict.fromkeys((f"{side}.mid_block.attentions.0.{n}{p}",) for n in names))
                return KeySource(options, reshape=True)
    if parts[0] in ("down", "up"):
        index = int(parts[1])
        level = index if parts[0] == "down" else num_levels - 1 - index
        blocks = "down_blocks" if parts[0] == "down" else "up_blocks"
        if parts[2] == "block":
            tail = ".".join(parts[4:]).replace("nin_shortcut.", "conv_shortcut.")
            return KeySource.one(f"{side}.{blocks}.{level}.resnets.{parts[3]}.{tail}")
        if parts[2] in ("downsample", "upsample"):
            sampler = "downsamplers" if parts[2] == "downsample" else "upsamplers"
            return KeySource.one(f"{side}.{blocks}.{level}.{sampler}.0.{'.'.join(parts[3:])}")
    if rest.startswith(("conv_in.", "conv_out.")):
        return KeySource.one(key)
    raise ConversionError(f"no diffusers name for autoencoder key {key}")


def vae_plan(keys: Any, num_levels: int) -> Plan:
    return {k: vae_key_source(k, num_levels) for k in keys}


# ------------------------------------------------------------------------------------------- configs


def _check_fixed(config: Mapping[str, Any], fixed: Mapping[str, Any], what: str) -> None:
    wrong = {}
    for name, value in fixed.items():
        got = config.get(name, value)
        if isinstance(got, list) and not isinstance(value, list) and len(set(map(str, got))) == 1:
            got = got[0]  # per-level lists with one value (e.g. only_cross_attention [False]*4)
        numeric = isinstance(value, float) and isinstance(got, (int, float))
        if (abs(got - value) > 1e-12) if numeric else (got != value):
            wrong[name] = got
    if wrong:
        raise ConversionError(f"{what}: settings our modules do not implement: "
                              + ", ".join(f"{k}={v!r} (supported: {fixed[k]!r})" for k, v in wrong.items()))


def _one(value: Any, levels: int, name: str, what: str) -> int:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(set(values)) != 1:
        raise ConversionError(f"{what}: {name}={values} differs between levels; our U-Net uses one value")
    return int(values[0])


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict:
    """UNetModel kwargs from a diffusers UNet2DConditionModel config.json."""
    what = "diffusers U-Net config"
    _check_fixed(config, _UNET_FIXED, what)
    only_cross = config.get("only_cross_attention") or False
    if any(only_cross if isinstance(only_cross, list) else [only_cross]):
        raise ConversionError(f"{what}: only_cross_attention is not supported")
    channels = [int(c) for c in config.get("block_out_channels", (320, 640, 1280, 1280))]
    levels = len(channels)
    model_channels = channels[0]
    if any(c % model_channels for c in channels):
        raise ConversionError(f"{what}: block_out_channels {channels} are not multiples of {model_channels}")
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if len(down) != levels or any(d not in kinds for d in down):
        raise ConversionError(f"{what}: down_block_types {down} (supported: {sorted(kinds)}, one per level)")
    mirror = [d.replace("Down", "Up") for d in reversed(down)]
    if up != mirror:
        raise ConversionError(f"{what}: up_block_types {up} do not mirror down_block_types (expected {mirror})")
    attention = [level for level, d in enumerate(down) if kinds[d]]

    heads_cfg = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = list(heads_cfg) if isinstance(heads_cfg, (list, tuple)) else [heads_cfg] * levels
    used = sorted(set(attention) | {levels - 1})  # the levels with transformers, and the middle block's
    used_heads = {int(heads[level]) for level in used}
    head_dims = {channels[level] // int(heads[level]) for level in used}
    if len(used_heads) == 1:
        num_heads, head_dim = used_heads.pop(), None
    elif len(head_dims) == 1 and all(channels[level] % int(heads[level]) == 0 for level in used):
        num_heads, head_dim = None, head_dims.pop()
    else:
        raise ConversionError(f"{what}: heads {heads} over widths {channels} give neither one head count nor "
                              "one head width")
    cross = config.get("cross_attention_dim", 1280)
    if config.get("upcast_attention"):
        logger.info("%s: upcast_attention=True only changes half-precision numerics, not the weights", what)
    return dict(
        in_channels=int(config.get("in_channels", 4)),
        out_channels=int(config.get("out_channels", 4)),
        model_channels=model_channels,
        channel_mult=[c // model_channels for c in channels],
        num_res_blocks=_one(config.get("layers_per_block", 2), levels, "layers_per_block", what),
        attention_resolutions=[2**level for level in reversed(attention)],  # CompVis order: (4, 2, 1)
        num_heads=num_heads,
        head_dim=head_dim,
        transformer_depth=_one(config.get("transformer_layers_per_block", 1), levels,
                               "transformer_layers_per_block", what),
        context_dim=_one(cross, levels, "cross_attention_dim", what),
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        dropout=float(config.get("dropout", 0.0)),
    )


def autoencoder_config_from_diffusers(config: Mapping[str, Any]) -> dict:
    """AutoencoderKL kwargs from a diffusers AutoencoderKL config.json."""
    what = "diffusers autoencoder config"
    _check_fixed(config, _VAE_FIXED, what)
    channels = [int(c) for c in config.get("block_out_channels", (64,))]
    down = config.get("down_block_types", ["DownEncoderBlock2D"] * len(channels))
    up = config.get("up_block_types", ["UpDecoderBlock2D"] * len(channels))
    if set(down) != {"DownEncoderBlock2D"} or set(up) != {"UpDecoderBlock2D"} or len(down) != len(channels):
        raise ConversionError(f"{what}: block types {down} / {up} are not supported")
    if config.get("in_channels", 3) != config.get("out_channels", 3):
        raise ConversionError(f"{what}: in_channels != out_channels is not supported")
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ConversionError(f"{what}: block_out_channels {channels} are not multiples of {ch}")
    latent = int(config.get("latent_channels", 4))
    return dict(
        in_channels=int(config.get("in_channels", 3)),
        ch=ch,
        ch_mult=[c // ch for c in channels],
        num_res_blocks=int(config.get("layers_per_block", 1)),
        z_channels=latent,
        embed_dim=latent,
        scale_factor=float(config.get("scaling_factor", 0.18215)),
        # diffusers uses norm_num_groups groups at every width, however narrow.
        norm="group",
        norm_groups=int(config.get("norm_num_groups", 32)),
        norm_group_channels=1,
    )


def schedule_from_diffusers(config: Mapping[str, Any]) -> dict | None:
    """NoiseSchedule kwargs from a diffusers scheduler config, or None for a schedule we do not build."""
    kinds = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
    kind = config.get("beta_schedule", "linear")
    if kind not in kinds or config.get("trained_betas") is not None:
        logger.info("diffusers scheduler: beta_schedule %r has no NoiseSchedule counterpart; schedule not set", kind)
        return None
    return dict(
        beta_schedule=kinds[kind],
        num_timesteps=int(config.get("num_train_timesteps", 1000)),
        linear_start=float(config.get("beta_start", 0.0001)),
        linear_end=float(config.get("beta_end", 0.02)),
        zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
    )


# ------------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"diffusers folder: {path} not found")
    return json.loads(path.read_text())


def read_component(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The state dict of one diffusers component folder (single file or index of shards)."""
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(_read_json(path)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_state_file(folder / shard, "weights shard")[0])
            return state
        state, _ = read_state_file(path, f"{folder.name} weights")
        return state
    raise ConversionError(f"diffusers folder {folder}: no weights file (looked for {', '.join(names)})")


def _pad_token(folder: Path) -> str:
    """SD1's tokenizer pads with EOS, SD2's with "!" (id 0); the tokenizer folder says which, if present."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / "tokenizer" / name
        if path.is_file():
            pad = json.loads(path.read_text()).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if pad is not None:
                return "eos" if pad == "<|endoftext|>" else "zero"
    return "eos"


def _text_encoder(folder: Path, explicit: Mapping[str, Any] | None) -> tuple[dict, dict, dict]:
    """(conditioner config, open_clip-layout state, open_clip model cfg) from text_encoder/."""
    hf_config = _read_json(folder / "text_encoder" / "config.json")
    state = hf_to_open_clip(read_component(folder / "text_encoder", _TEXT_WEIGHTS),
                            what=f"{folder}/text_encoder")
    text_cfg, quick_gelu = text_cfg_from_hf_config(hf_config)
    if explicit is not None:
        config = {"_target_": TEXT_ENCODER_TARGET, **explicit}
        model_cfg = model_cfg_of(config["arch"])
        state = pad_blocks(state, int(model_cfg["text_cfg"]["layers"]))
        return config, state, model_cfg
    vit_h = model_cfg_of("ViT-H-14")["text_cfg"]
    if not quick_gelu and {**text_cfg, "layers": text_cfg["layers"] + 1} == {**vit_h, "mlp_ratio": 4.0}:
        # SD2: diffusers keeps 23 of ViT-H-14's 24 blocks, so that its last layer is SD2's penultimate one.
        config = {"_target_": TEXT_ENCODER_TARGET, **SD2_CONDITIONER}
        return config, pad_blocks(state, vit_h["layers"]), model_cfg_of("ViT-H-14")
    arch, model_cfg = open_clip_arch_for(text_cfg, quick_gelu)
    # diffusers pipelines use last_hidden_state: every stored block, then final_layer_norm.
    config = {"_target_": TEXT_ENCODER_TARGET, "arch": arch, "layer": "last", "final_norm": True,
              "pad_token": _pad_token(folder), "use_mask": False}
    return config, state, model_cfg


def convert_diffusers(folder: str | Path, explicit: Mapping[str, Any] | None = None) -> ConvertedWeights:
    """Converts a diffusers pipeline folder; ``explicit`` holds part configs that replace config.json's."""
    folder = Path(folder)
    explicit = dict(explicit or {})
    out = ConvertedWeights()
    if (folder / "unet").is_dir():
        config = explicit.get("unet") or unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"))
        source = read_component(folder / "unet", _UNET_WEIGHTS)
        plan = unet_plan(unet_shapes(config), int(config["num_res_blocks"]))
        what = f"{folder}/unet"
        log_ignored(check_keys(source, {"U-Net": plan}, what), what)
        out.unet_config, out.unet_state = config, apply_plan(source, plan, unet_shapes(config), what)
        out.family = family_of(config["context_dim"], config["use_linear_projection"]) or "custom"
    if (folder / "vae").is_dir():
        config = explicit.get("autoencoder") or autoencoder_config_from_diffusers(
            _read_json(folder / "vae" / "config.json"))
        source = read_component(folder / "vae", _UNET_WEIGHTS)
        shapes = autoencoder_shapes(config)
        plan = vae_plan(shapes, len(config["ch_mult"]))
        what = f"{folder}/vae"
        log_ignored(check_keys(source, {"autoencoder": plan}, what), what)
        out.autoencoder_config, out.autoencoder_state = config, apply_plan(source, plan, shapes, what)
    if (folder / "text_encoder").is_dir():
        out.conditioner_config, out.conditioner_state, out.open_clip_model_cfg = _text_encoder(
            folder, explicit.get("conditioner"))
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        scheduler_config = json.loads(scheduler.read_text())
        out.prediction_type = _PREDICTION_TYPES.get(scheduler_config.get("prediction_type", "epsilon"))
        out.schedule_config = schedule_from_diffusers(scheduler_config)
    if out.unet_state is None and out.autoencoder_state is None and out.conditioner_state is None:
        raise ConversionError(f"{folder}: no unet/, vae/ or text_encoder/ folder; not a diffusers pipeline folder")
    logger.info("diffusers folder %s converted (%s)", folder, out.family)
    return out
