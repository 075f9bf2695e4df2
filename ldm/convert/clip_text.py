"""CLIP text towers: Hugging Face ``CLIPTextModel`` layout ↔ the open_clip layout our text encoder uses.

    HF (text_model.)                                  open_clip (FrozenOpenCLIPTextEncoder.text)
    embeddings.token_embedding.weight                 token_embedding.weight
    embeddings.position_embedding.weight              positional_embedding
    encoder.layers.N.layer_norm1 / layer_norm2        transformer.resblocks.N.ln_1 / ln_2
    encoder.layers.N.self_attn.{q,k,v}_proj           transformer.resblocks.N.attn.in_proj_weight / _bias
                                                        (q, k, v concatenated along the output axis,
                                                        the packing of nn.MultiheadAttention)
    encoder.layers.N.self_attn.out_proj               transformer.resblocks.N.attn.out_proj
    encoder.layers.N.mlp.fc1 / fc2                    transformer.resblocks.N.mlp.c_fc / c_proj
    final_layer_norm                                  ln_final

transformers < 5 (and every SD release) prefix the HF keys with ``text_model.``; transformers 5 does not;
both are read.

Both are pre-LayerNorm transformers with a causal mask and LayerNorm eps 1e-5, so equal weights give equal
hidden states. What the weights do not say is the number of heads and the activation: OpenAI's CLIP (SD1's
ViT-L/14, stored in HF layout) uses QuickGELU, x·σ(1.702x), which open_clip builds for the
``ViT-L-14-quickgelu`` arch; OpenCLIP ViT-H/14 (SD2) uses exact GELU (``ViT-H-14``). An HF config.json
states both (``num_attention_heads``, ``hidden_act``); for a bare single file they follow from the family.

Which layer is the context: SD1 takes HF's ``last_hidden_state`` (the last block, then final_layer_norm) =
our layer="last", final_norm=True. SD2 takes the penultimate block's output, then ln_final = our
layer="penultimate", final_norm=True. diffusers stores SD2's text encoder with the last block cut off (23 of
24), so that its ``last_hidden_state`` is SD2's context; loading it into ViT-H-14 puts back a block of zeros
(see ``pad_blocks``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import open_clip
import torch
from safetensors.torch import save_file

from ldm.conditioning.text import FrozenOpenCLIPTextEncoder
from ldm.convert.key_mapping import ConversionError, KeySource, Plan, apply_plan, check_keys, format_keys

logger = logging.getLogger(__name__)

# The `_target_` of the conditioner configs a conversion writes: the class that loads its text weights.
TEXT_ENCODER_TARGET = f"{FrozenOpenCLIPTextEncoder.__module__}.{FrozenOpenCLIPTextEncoder.__qualname__}"

HF_PREFIX = "text_model."
# Built-in open_clip archs a converted tower may turn out to be; anything else gets its own config folder.
_BUILTIN_ARCHS = ("ViT-L-14-quickgelu", "ViT-L-14", "ViT-H-14", "ViT-H-14-quickgelu", "ViT-B-32",
                  "ViT-B-32-quickgelu")
_TEXT_CFG_FIELDS = ("width", "heads", "layers", "context_length", "vocab_size", "mlp_ratio")
_HF_ACTIVATIONS = {"quick_gelu": True, "gelu": False}
_BLOCK_PARTS = (
    ("ln_1.weight", "layer_norm1.weight"),
    ("ln_1.bias", "layer_norm1.bias"),
    ("attn.out_proj.weight", "self_attn.out_proj.weight"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias"),
    ("ln_2.weight", "layer_norm2.weight"),
    ("ln_2.bias", "layer_norm2.bias"),
    ("mlp.c_fc.weight", "mlp.fc1.weight"),
    ("mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.fc2.weight"),
    ("mlp.c_proj.bias", "mlp.fc2.bias"),
)

# Conditioner settings of the two Stable Diffusion families. The original models attended to the padding
# too (use_mask False) and padded with EOS (SD1, the HF tokenizer) or with 0 (SD2, open_clip.tokenize).
SD1_CONDITIONER = dict(arch="ViT-L-14-quickgelu", layer="last", final_norm=True, pad_token="eos", use_mask=False)
SD2_CONDITIONER = dict(arch="ViT-H-14", layer="penultimate", final_norm=True, pad_token="zero", use_mask=False)


# ------------------------------------------------------------------------------------------- key layouts


def count_blocks(keys: Any, marker: str) -> int:
    """Number of blocks N with keys containing ``marker + "N."`` (e.g. "resblocks.")."""
    found = set()
    for key in keys:
        if marker in key:
            index = key.split(marker, 1)[1].split(".", 1)[0]
            if index.isdigit():
                found.add(int(index))
    if found and found != set(range(len(found))):
        raise ConversionError(f"text tower blocks are not numbered 0..{len(found) - 1}: {sorted(found)}")
    return len(found)


def hf_plan(num_layers: int, prefix: str = HF_PREFIX) -> Plan:
    """open_clip key → HF key(s), for a tower of ``num_layers`` blocks whose HF keys start with ``prefix``."""
    plan: Plan = {
        "token_embedding.weight": KeySource.one(f"{prefix}embeddings.token_embedding.weight"),
        "positional_embedding": KeySource.one(f"{prefix}embeddings.position_embedding.weight"),
    }
    for i in range(num_layers):
        ours, theirs = f"transformer.resblocks.{i}.", f"{prefix}encoder.layers.{i}."
        for p in ("weight", "bias"):
            plan[f"{ours}attn.in_proj_{p}"] = KeySource(
                (tuple(f"{theirs}self_attn.{x}_proj.{p}" for x in "qkv"),)
            )
        for our_part, their_part in _BLOCK_PARTS:
            plan[ours + our_part] = KeySource.one(theirs + their_part)
    plan["ln_final.weight"] = KeySource.one(f"{prefix}final_layer_norm.weight")
    plan["ln_final.bias"] = KeySource.one(f"{prefix}final_layer_norm.bias")
    return plan


def open_clip_plan(keys: Any, prefix: str = "") -> Plan:
    return {k: KeySource.one(prefix + k) for k in keys}


def hf_ignorable(prefix: str = HF_PREFIX):
    # position_ids is a constant arange buffer older transformers versions saved with the weights.
    return lambda key: key == f"{prefix}embeddings.position_ids"


def hf_prefix_of(state: Mapping[str, Any]) -> str:
    """"text_model." for files of transformers < 5 (and every SD release), "" for transformers 5, which
    dropped the text_model wrapper from CLIPTextModel's keys."""
    return HF_PREFIX if any(k.startswith(HF_PREFIX + "embeddings.") for k in state) else ""


def hf_to_open_clip(state: Mapping[str, torch.Tensor], prefix: str | None = None,
                    what: str = "HF CLIP text model") -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict (keys ``prefix`` + ...) → the open_clip text tower layout. Strict.

    prefix: None detects "text_model." or no prefix.
    """
    prefix = hf_prefix_of(state) if prefix is None else prefix
    plan = hf_plan(count_blocks(state, f"{prefix}encoder.layers."), prefix)
    check_keys(state, {"text encoder": plan}, what, hf_ignorable(prefix))
    return apply_plan(state, plan, text_shapes(text_cfg_from_state(state, plan)), what)


def open_clip_to_hf(state: Mapping[str, torch.Tensor], prefix: str = HF_PREFIX) -> dict[str, torch.Tensor]:
    """The inverse: open_clip text tower → CLIPTextModel keys (``prefix`` + ...). q, k, v are split."""
    plan = hf_plan(count_blocks(state, "resblocks."), prefix)
    out: dict[str, torch.Tensor] = {}
    for key, source in plan.items():
        if key not in state:
            raise ConversionError(f"open_clip text tower lacks {key}")
        keys = source.options[0]
        parts = state[key].chunk(len(keys), dim=0) if len(keys) > 1 else (state[key],)
        for their_key, tensor in zip(keys, parts):
            out[their_key] = tensor.contiguous()
    if len(plan) != len(state):
        raise ConversionError(f"open_clip text tower has keys with no HF counterpart: "
                              f"{format_keys(set(state) - set(plan))}")
    return out


def pad_blocks(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Appends all-zero blocks up to ``num_layers``.

    A pre-LayerNorm block with zero weights is exactly the identity (attention and MLP both add 0), so the
    padded tower computes the same function at every layer. Used to fit diffusers' 23-block copy of SD2's
    ViT-H-14 text tower (its 24th block, which SD2 never runs, was cut) back into ViT-H-14.
    """
    have = count_blocks(state, "resblocks.")
    template = {k.split(".", 3)[3]: v for k, v in state.items() if k.startswith("transformer.resblocks.0.")}
    state = dict(state)
    for i in range(have, num_layers):
        for name, tensor in template.items():
            state[f"transformer.resblocks.{i}.{name}"] = torch.zeros_like(tensor)
    if num_layers > have:
        logger.info("text tower: blocks %d..%d added as zero (identity) blocks", have, num_layers - 1)
    return state


# ------------------------------------------------------------------------------------------- architectures


def text_cfg_from_state(state: Mapping[str, torch.Tensor], plan: Plan | None = None) -> dict:
    """open_clip text_cfg fields readable from the shapes (not heads: they are not stored in the weights)."""
    def get(key: str) -> torch.Tensor:
        source = plan[key].options[0][0] if plan is not None else key
        if source not in state:
            raise ConversionError(f"text tower: key {source} missing")
        return state[source]

    tokens = get("token_embedding.weight")
    width = int(tokens.shape[1])
    layers = count_blocks(plan if plan is not None else state, "resblocks.")
    return dict(
        width=width,
        layers=layers,
        context_length=int(get("positional_embedding").shape[0]),
        vocab_size=int(tokens.shape[0]),
        mlp_ratio=(get("transformer.resblocks.0.mlp.c_fc.weight").shape[0] / width) if layers else 4.0,
    )


def text_shapes(text_cfg: Mapping[str, Any]) -> dict[str, torch.Size]:
    """Shapes of an open_clip text tower (the keys of FrozenOpenCLIPTextEncoder.text) for a text_cfg."""
    w, vocab, ctx = int(text_cfg["width"]), int(text_cfg["vocab_size"]), int(text_cfg["context_length"])
    mlp = int(w * float(text_cfg.get("mlp_ratio", 4.0)))
    shapes = {"token_embedding.weight": (vocab, w), "positional_embedding": (ctx, w)}
    for i in range(int(text_cfg["layers"])):
        b = f"transformer.resblocks.{i}."
        shapes.update({
            b + "ln_1.weight": (w,), b + "ln_1.bias": (w,),
            b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,),
            b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
            b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
            b + "mlp.c_fc.weight": (mlp, w), b + "mlp.c_fc.bias": (mlp,),
            b + "mlp.c_proj.weight": (w, mlp), b + "mlp.c_proj.bias": (w,),
        })
    shapes.update({"ln_final.weight": (w,), "ln_final.bias": (w,)})
    return {k: torch.Size(v) for k, v in shapes.items()}


def text_cfg_from_hf_config(hf_config: Mapping[str, Any]) -> tuple[dict, bool]:
    """A transformers CLIPTextConfig (as a dict) → (open_clip text_cfg, quick_gelu)."""
    act = hf_config.get("hidden_act", "quick_gelu")
    if act not in _HF_ACTIVATIONS:
        raise ConversionError(f"CLIP text config: hidden_act {act!r} has no open_clip counterpart "
                              f"(supported: {sorted(_HF_ACTIVATIONS)})")
    eps = float(hf_config.get("layer_norm_eps", 1e-5))
    if abs(eps - 1e-5) > 1e-12:
        raise ConversionError(f"CLIP text config: layer_norm_eps {eps} differs from open_clip's 1e-5")
    width = int(hf_config.get("hidden_size", 512))
    text_cfg = dict(
        width=width,
        heads=int(hf_config.get("num_attention_heads", 8)),
        layers=int(hf_config.get("num_hidden_layers", 12)),
        context_length=int(hf_config.get("max_position_embeddings", 77)),
        vocab_size=int(hf_config.get("vocab_size", 49408)),
        mlp_ratio=int(hf_config.get("intermediate_size", 2048)) / width,
    )
    return text_cfg, _HF_ACTIVATIONS[act]


def normalized_text_cfg(text_cfg: Mapping[str, Any]) -> dict:
    cfg = {k: text_cfg[k] for k in _TEXT_CFG_FIELDS if k in text_cfg}
    cfg.setdefault("mlp_ratio", 4.0)
    cfg["mlp_ratio"] = float(cfg["mlp_ratio"])
    return cfg


def model_cfg_of(arch: str) -> dict:
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ConversionError(f"open_clip has no model config {arch!r}")
    return cfg


_ARCH_DIRS: dict[str, str] = {}


def scratch_dir(prefix: str) -> str:
    """A directory that lives as long as the process (for open_clip archs built from converted configs)."""
    return tempfile.mkdtemp(prefix=prefix)


def open_clip_arch_for(text_cfg: Mapping[str, Any], quick_gelu: bool, directory: str | None = None) -> tuple[str, dict]:
    """The open_clip arch name with this text tower: a built-in one if any matches, else a config folder.

    A folder arch is ``local-dir:PATH`` with ``PATH/open_clip_config.json`` (open_clip's own schema), so it
    can be rebuilt in any process that sees the folder. Its image tower is a token one-layer ViT: the text
    encoder throws the image tower away. Returns (arch, open_clip model config).
    """
    wanted = normalized_text_cfg(text_cfg)
    for arch in _BUILTIN_ARCHS:
        cfg = open_clip.get_model_config(arch)
        if cfg is None or set(cfg["text_cfg"]) - set(_TEXT_CFG_FIELDS):
            continue
        if normalized_text_cfg(cfg["text_cfg"]) == wanted and bool(cfg.get("quick_gelu", False)) == quick_gelu:
            return arch, cfg
    model_cfg = {
        "embed_dim": int(wanted["width"]),
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": wanted,
    }
    return _arch_folder(model_cfg, directory), model_cfg


def _arch_folder(model_cfg: dict, directory: str | None) -> str:
    text = json.dumps({"model_cfg": model_cfg}, sort_keys=True, indent=2)
    name = "open_clip_" + hashlib.sha1(text.encode()).hexdigest()[:12]
    if directory is None:
        directory = _ARCH_DIRS.setdefault("scratch", scratch_dir("ldm_open_clip_archs_"))
    # No weights may sit in this folder: open_clip would try to load any *.safetensors in it as a full CLIP.
    folder = Path(directory) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(text)
    return f"local-dir:{folder.resolve()}"


def resolve_arch(config: Mapping[str, Any], model_cfg: Mapping[str, Any] | None, directory: str | None = None) -> str:
    """The arch of a conditioner config, recreated from its model config if its folder is gone."""
    arch = str(config["arch"])
    if arch.startswith("local-dir:") and not Path(arch[len("local-dir:"):]).is_dir():
        if model_cfg is None:
            raise ConversionError(f"open_clip arch folder {arch} does not exist and no model config is at hand")
        return _arch_folder(dict(model_cfg), directory)
    return arch


# ------------------------------------------------------------------------------------------- building


def conditioner_from_state(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> FrozenOpenCLIPTextEncoder:
    """A FrozenOpenCLIPTextEncoder built from its kwargs (``_target_``/``pretrained`` ignored) with the
    given open_clip-layout text weights, which must fit its tower key for key."""
    kwargs = {k: v for k, v in config.items() if k not in ("_target_", "pretrained")}
    try:
        # The weights go in as `pretrained`: the encoder is never built with random weights (and never says so).
        encoder = FrozenOpenCLIPTextEncoder(pretrained=dict(state), **kwargs)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    logger.info("text encoder %s: converted weights loaded", kwargs.get("arch"))
    return encoder


def write_text_weights(directory: str | os.PathLike, config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                       model_cfg: Mapping[str, Any] | None) -> dict:
    """Writes ``directory/text_encoder.safetensors`` (and the arch folder, for a non-built-in arch); returns
    the conditioner config that loads them (``pretrained`` set)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "text_encoder.safetensors"
    tmp = path.with_suffix(".safetensors.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written weights file under the real name
    arch = str(config["arch"])
    if arch.startswith("local-dir:"):
        arch = _arch_folder(dict(model_cfg or model_cfg_of(arch)), str(directory))
    logger.info("text encoder weights written to %s", path)
    return {"_target_": TEXT_ENCODER_TARGET, **{k: v for k, v in config.items() if k != "_target_"},
            "arch": arch, "pretrained": str(path)}
