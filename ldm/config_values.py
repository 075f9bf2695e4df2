"""Config values as plain Python: what checkpoints store must load with ``torch.load(weights_only=True)``, which
reads plain dicts and lists, not OmegaConf containers."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def plain(value: Any) -> Any:
    """OmegaConf containers → plain dicts/lists (resolved); anything else unchanged."""
    if isinstance(value, DictConfig) or OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value
