"""Data: webdataset shards → {"image", "caption", "key"} batches; builders for the built-in emoji dataset
(`python -m ldm.data.build_emoji`) and for folders of captioned images (`python -m ldm.data.build_folder`).

Names are imported on first use: the shard builders need neither torch nor Lightning, and DataLoader workers
started with "spawn" re-import this package without needing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ldm.data.datamodule import ShardDataModule
    from ldm.data.decoders import IMAGE_EXTENSIONS, collate_samples, decode_image
    from ldm.data.shards import ShardDataset, ShardLoader
    from ldm.data.specs import expand_shards
    from ldm.data.stats import SKIP_REASONS, DataStats
    from ldm.data.transforms import ImageTransform, to_rgb
    from ldm.data.writer import TarShardWriter

_EXPORTS: dict[str, str] = {
    "ShardDataModule": "ldm.data.datamodule",
    "IMAGE_EXTENSIONS": "ldm.data.decoders",
    "SKIP_REASONS": "ldm.data.stats",
    "DataStats": "ldm.data.stats",
    "ShardDataset": "ldm.data.shards",
    "ShardLoader": "ldm.data.shards",
    "collate_samples": "ldm.data.decoders",
    "decode_image": "ldm.data.decoders",
    "expand_shards": "ldm.data.specs",
    "ImageTransform": "ldm.data.transforms",
    "to_rgb": "ldm.data.transforms",
    "TarShardWriter": "ldm.data.writer",
}

__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "DataStats",
    "ImageTransform",
    "ShardDataModule",
    "ShardDataset",
    "ShardLoader",
    "TarShardWriter",
    "collate_samples",
    "decode_image",
    "expand_shards",
    "to_rgb",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
