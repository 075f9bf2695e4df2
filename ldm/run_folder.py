"""A train.py run folder read after the run: its config as it was resolved during the run.

Hydra saves the composed config with its own interpolations left in (``${hydra:runtime.cwd}`` in the paths);
outside Hydra they resolve to the values of that run, read from the ``hydra.yaml`` it saved next to the config,
so a run started from another folder still finds its data.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def saved_config(run_dir: str | os.PathLike) -> DictConfig | None:
    """RUN/.hydra/config.yaml with Hydra's interpolations resolving to the run's values, or None if absent."""
    run_dir = Path(run_dir).resolve()
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    hydra = run_dir / ".hydra" / "hydra.yaml"
    cwd = OmegaConf.load(hydra).hydra.runtime.get("cwd") if hydra.is_file() else None
    runtime = {"runtime.cwd": str(cwd or Path.cwd()), "runtime.output_dir": str(run_dir)}
    OmegaConf.register_new_resolver("hydra", lambda key: runtime[key], replace=True)
    return OmegaConf.load(path)
