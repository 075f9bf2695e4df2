"""Low-rank adapters (LoRA, Hu et al. 2021) on a model's linear projections, built with peft.

    y = W x  →  y = W x + (α / r) · B A x        A (r, d_in) random, B (d_out, r) zero at the start

W stays frozen; only A and B train, so a fine-tune is a few MB instead of the whole model, and at the start
the adapted model is exactly the base model (B = 0). ``scale`` multiplies α / r at inference: 0 is the base
model, 1 the trained adapter. Merging folds (α / r)·scale·B A into W, which gives the same outputs with no
extra cost per step.

Adapter files (``save_lora`` / ``load_lora``) are safetensors with one entry per A and B matrix, named by the
module path in our models (``unet.<path>.lora_A.weight``, ``text_encoder.<path>.lora_B.weight``), and the
settings (rank, alpha, target modules) in the metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

# The U-Net's attention projections (ldm.modules.transformer.Attention), as in the LoRA paper's choice of
# W_q, W_k, W_v, W_o and diffusers' DreamBooth-LoRA.
UNET_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
# An open_clip text block: ``attn`` is a torch MultiheadAttention (its fused q/k/v and output projections),
# ``c_fc`` / ``c_proj`` the MLP. peft adapts a MultiheadAttention as a whole.
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("attn", "c_fc", "c_proj")
ADAPTER = "default"  # peft's adapter name; one adapter per model here
FORMAT = "ldm-lora-1"
PARTS = ("unet", "text_encoder")


class LoRAError(ValueError):
    """An adapter that does not fit the model, or settings that make no sense."""


@dataclass
class LoRASettings:
    """rank r, alpha α (the update is scaled by α / r), dropout on the adapter's input, the modules adapted."""

    enabled: bool = False
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    text_encoder: bool = False
    target_modules: list[str] = field(default_factory=lambda: list(UNET_TARGETS))
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_TARGETS))

    @classmethod
    def parse(cls, value: bool | Mapping[str, Any] | "LoRASettings" | None) -> "LoRASettings":
        """From a config value: null / false (off), true (on, default settings) or a mapping of the fields."""
        if isinstance(value, LoRASettings):
            return value
        if value is None or value is False:
            return cls()
        if value is True:
            return cls(enabled=True)
        if not isinstance(value, Mapping):
            raise LoRAError(f"lora must be true, false or a mapping of {[f.name for f in fields(cls)]}, got {value!r}")
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise LoRAError(f"unknown lora setting(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        settings = cls(**{k: (list(v) if k.endswith("target_modules") else v) for k, v in value.items()})
        if settings.rank < 1:
            raise LoRAError(f"lora.rank must be >= 1, got {settings.rank}")
        if not 0.0 <= settings.dropout < 1.0:
            raise LoRAError(f"lora.dropout must lie in [0, 1), got {settings.dropout}")
        if not settings.target_modules:
            raise LoRAError("lora.target_modules is empty")
        return settings

    def as_dict(self) -> dict:
        return asdict(self)


def _peft():
    try:
        import peft
    except ImportError as e:  # an optional dependency: only LoRA needs it
        raise ImportError("LoRA needs peft: pip install -c constraints.txt -e '.[lora]'") from e
    return peft


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    try:
        return bool(_lora_layers(model))
    except ImportError:
        return False


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str] | tuple[str, ...],
             what: str = "model") -> nn.Module:
    """Inserts adapters (B = 0: outputs unchanged) into the modules whose path ends with a target name, in
    place; freezes every other parameter of ``model``. Returns ``model``."""
    peft = _peft()
    config = peft.LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                             target_modules=list(target_modules))
    try:
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise LoRAError(f"{what}: no module matches lora target_modules {list(target_modules)} "
                        f"({str(e).splitlines()[0]})") from e
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The A and B matrices alone, keyed ``<module path>.lora_A.weight`` (peft's adapter name left out)."""
    suffix = f".{ADAPTER}."
    return {name.replace(suffix, "."): p.detach() for name, p in model.named_parameters()
            if ".lora_A." in name or ".lora_B." in name}


def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "adapter") -> None:
    """Loads A and B matrices into a model that has adapters in place; every key must fit, in both directions."""
    own = lora_state_dict(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}"
                 for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if misshapen:
        problems.append(f"{len(misshapen)} of another shape (e.g. {misshapen[:3]})")
    if problems:
        raise LoRAError(f"{what} does not fit the model: adapter weights " + "; ".join(problems))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            # key "<path>.lora_A.weight" ↔ parameter "<path>.lora_A.default.weight"
            head, _, tail = key.rpartition(".")
            params[f"{head}.{ADAPTER}.{tail}"].copy_(value)


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Scales every adapter's update: scaling = scale · α / r (0: the base model, 1: as trained)."""
    for _, layer in _lora_layers(model):
        layer.set_scale(ADAPTER, float(scale))


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight and puts the plain base module back, in place: the state dict
    then has the base model's keys again. Returns ``model`` (or the merged module if ``model`` itself is one)."""
    layers = _lora_layers(model)
    # An adapted MultiheadAttention holds its adapted out_proj; peft merges the two together.
    outer = [(name, m) for name, m in layers
             if not any(name.startswith(other + ".") for other, _ in layers if other and other != name)]
    for name, layer in outer:
        if hasattr(layer, "unload_and_optionally_merge_module"):  # MultiheadAttention re-registers its weights
            base = layer.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        else:
            layer.merge(safe_merge=True)
            base = layer.get_base_layer()
        if not name:
            return base
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
    return model


# ------------------------------------------------------------------------------------------- files


def save_lora(path: str | os.PathLike, parts: Mapping[str, Mapping[str, torch.Tensor]],
              settings: LoRASettings, extra: Mapping[str, Any] | None = None) -> int:
    """Writes adapter weights {"unet": state, "text_encoder": state} to a .safetensors file (atomically).
    Returns the number of tensors."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoRAError(f"adapter files are .safetensors, got {path}")
    tensors = {f"{part}.{k}": v.detach().to("cpu", torch.float32).contiguous().clone()
               for part, state in parts.items() if state for k, v in state.items()}
    if not tensors:
        raise LoRAError("no adapter weights to save (was the model trained with lora.enabled=true?)")
    unknown = {k.split(".")[0] for k in tensors} - set(PARTS)
    if unknown:
        raise LoRAError(f"unknown adapter parts {sorted(unknown)}; expected {PARTS}")
    metadata = {"format": FORMAT, "lora": json.dumps(settings.as_dict()), **{k: json.dumps(v) for k, v in
                                                                            (extra or {}).items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return len(tensors)


def read_lora(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], LoRASettings]:
    """({"unet": state, "text_encoder": state}, settings) of an adapter file written by ``save_lora``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA adapter not found: {path}")
    if path.suffix != ".safetensors":
        raise LoRAError(f"{path}: adapter files are .safetensors (python -m ldm.export_lora writes them)")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("format") != FORMAT or "lora" not in metadata:
        raise LoRAError(f"{path} is not an adapter file of this framework (no '{FORMAT}' metadata); "
                        "python -m ldm.export_lora CKPT OUT.safetensors writes one")
    settings = LoRASettings.parse(json.loads(metadata["lora"]))
    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        if part not in parts or not (".lora_A." in key or ".lora_B." in key):
            raise LoRAError(f"{path}: unexpected entry {key!r} (adapter files hold lora_A/lora_B weights only)")
        parts[part][rest] = value
    return parts, settings
