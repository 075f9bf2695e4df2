"""Random number generator states for checkpoints, and per-sample generators.

Resuming restores the torch (CPU and CUDA), numpy and Python RNGs, so a resumed run draws the same timesteps,
noise and caption dropout as the run that was interrupted. The states are stored as tensors, ints and lists
only, so checkpoints stay loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The global RNG states of this process."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (CUDA states only where the same number of devices is present)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"],
        "gauss": np_state["gauss"],
    })
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def sample_seed(*parts: object) -> int:
    """A 63-bit seed from the given parts (e.g. run seed, sample key, step), the same in every process
    (Python's own ``hash`` of a string differs between processes)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generators(keys: list[str], *parts: object) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (parts..., key)."""
    return [torch.Generator().manual_seed(sample_seed(*parts, key)) for key in keys]
