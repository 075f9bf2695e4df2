"""The strict key-for-key remapping every converter goes through, and the reading of the files it maps.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors import safe_open

from ldm.weights_io import describe_load_error, refers_to_code

logger = logging.getLogger(__name__)

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


def log_ignored(ignored: list[str], what: str) -> None:
    if ignored:
        logger.info("%s: %d keys hold no weights of our models and were left out: %s", what, len(ignored),
                    format_keys(ignored))


def read_state_file(path: str | os.PathLike, what: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(contents, safetensors metadata) of a weights file. Pickles load with weights_only=True only."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
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
