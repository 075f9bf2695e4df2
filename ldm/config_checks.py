"""Checks of config values that would otherwise fail late and far from their key: a run that builds its model and
then stops on a bare TypeError for `trainer.max_steps=abc`, or at its first step with a latent-size mismatch for
`data.resolution=60`. Each problem is one line that names the key, the value and what would do."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# key → (test, what it must be). Only values Lightning or the data pipeline accept without a look and choke on later.
_TRAINER_KEYS = {
    "max_steps": (lambda v: _is_int(v) and v >= -1, "an integer >= 1 (-1: no limit)"),
    "max_epochs": (lambda v: v is None or (_is_int(v) and v >= -1), "an integer >= 1 (-1: no limit) or null"),
    "num_nodes": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "accumulate_grad_batches": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "log_every_n_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "check_val_every_n_epoch": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or null"),
    "gradient_clip_val": (lambda v: v is None or (_is_number(v) and v >= 0), "a number >= 0 or null"),
    "devices": (lambda v: (_is_int(v) and v >= -1) or isinstance(v, str) or hasattr(v, "__len__"),
                "an integer, 'auto' or a list of device indices"),
}
_DATA_KEYS = {
    "resolution": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "num_workers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "epoch_length": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or null"),
}


def _check(node: DictConfig | None, prefix: str, rules: dict) -> list[str]:
    problems = []
    for key, (test, what) in rules.items():
        if node is not None and key in node and not test(node[key]):
            problems.append(f"{prefix}.{key} must be {what}, got {node[key]!r}")
    return problems


def check_train_config(cfg: DictConfig) -> None:
    """Types and ranges of the trainer and data values, before anything is built."""
    problems = _check(cfg.get("trainer"), "trainer", _TRAINER_KEYS) + _check(cfg.get("data"), "data", _DATA_KEYS)
    if cfg.get("trainer") is not None and cfg.trainer.get("max_steps") == 0:
        problems.append("trainer.max_steps must be an integer >= 1 (-1: no limit), got 0")
    if problems:
        raise ValueError("config error: " + "; ".join(problems))


def check_image_size(size: int, model, key: str) -> None:
    """``size`` (pixels) must be divisible by everything that halves it on the way to the U-Net's deepest level."""
    factors = [("the autoencoder", model.autoencoder.downsampling_factor)]
    if getattr(model, "unet", None) is not None:
        factors.append(("the U-Net", model.unet.downsampling_factor))
    multiple = 1
    for _, factor in factors:
        multiple *= factor
    if size % multiple:
        below, above = size - size % multiple, size - size % multiple + multiple
        how = " and ".join(f"{name} by {factor}" for name, factor in factors)
        raise ValueError(f"{key}={size} is not a multiple of {multiple} ({how} downsample it): use "
                         f"{below or above}" + (f" or {above}" if below else ""))


def check_generation_options(n: int, steps: int, cfg_scale: float, eta: float, guidance_rescale: float,
                             batch_size: int) -> None:
    """Sampling arguments (sample.py keys and LatentDiffusionPipeline.generate arguments of the same names)."""
    problems = []
    if not _is_int(n) or n < 1:
        problems.append(f"n (images per prompt) must be an integer >= 1, got {n!r}")
    if not _is_int(steps) or steps < 1:
        problems.append(f"steps must be an integer >= 1, got {steps!r}")
    if not _is_number(cfg_scale) or cfg_scale < 0:
        problems.append(f"cfg_scale must be a number >= 0 (1: no guidance, 0: unconditional), got {cfg_scale!r}")
    if not _is_number(eta) or eta < 0:
        problems.append(f"eta must be a number >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta!r}")
    if not _is_number(guidance_rescale) or not 0 <= guidance_rescale <= 1:
        problems.append(f"guidance_rescale must lie in [0, 1], got {guidance_rescale!r}")
    if not _is_int(batch_size) or batch_size < 1:
        problems.append(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if problems:
        raise ValueError("; ".join(problems))
