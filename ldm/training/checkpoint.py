"""Reading checkpoints safely: safetensors, or torch.load with weights_only=True. Never unpickle code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ldm.weights_io import describe_load_error, refers_to_code


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not what was expected."""


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
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
