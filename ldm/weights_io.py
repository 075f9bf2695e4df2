"""Reading weight files safely (safetensors, or torch.load with weights_only=True: never unpickling code), and
saying plainly why one cannot be read."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ldm.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable or not what was expected."""


def describe_load_error(error: BaseException) -> str:
    """The reason in torch.load's error, without its advice: the global a pickle refers to (a file that would run
    code), the unpickler's complaint (bytes that are no pickle), or the error's first line (zip/truncation)."""
    message = str(error)
    found = re.search(r"Unsupported global: GLOBAL [^\s]+", message)
    if found:
        return found.group(0)
    found = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(Check the documentation|$)", message, re.DOTALL)
    if found and found.group(1):
        return f"{type(error).__name__}: " + " ".join(found.group(1).split())[:200]
    return f"{type(error).__name__}: " + (message.strip().splitlines() or [""])[0][:200]


def refers_to_code(error: BaseException) -> bool:
    """Whether torch refused a pickle because it would build objects other than tensors (and could run code)."""
    return "Unsupported global" in str(error)


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """A checkpoint file as a dict ({"state_dict": ...} for .safetensors); a CheckpointError naming the problem."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{what} is a directory, expected a file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {"state_dict": load_file(str(path))}
    try:
        # weights_only: tensors and plain containers only; a pickle that would run code is refused.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, zip errors, truncated files, bytes of another format
        if refers_to_code(e):
            raise CheckpointError(f"refused to read {what} {path}: it holds Python objects other than tensors, which "
                                  f"could run code on load ({describe_load_error(e)})") from e
        raise CheckpointError(f"{what} {path} is not a readable checkpoint: not a torch file or .safetensors, or "
                              f"cut short ({describe_load_error(e)})") from e
