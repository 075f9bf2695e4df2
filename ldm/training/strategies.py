"""Fully Sharded Data Parallel (FSDP) for the diffusion module: `trainer=fsdp`.

Lightning's FSDPStrategy, with three changes that fit a latent diffusion model:

* Only the trainable network is sharded, one FSDP unit per U-Net block (``wrap_modules``): a block's weights
  are gathered just before it runs and freed after. The frozen autoencoder and text encoder and the EMA copy
  stay whole on every rank (FSDP's ``ignored_modules``, named by the LightningModule's
  ``fsdp_ignored_modules()``): they take no gradients, so sharding them would only add all-gathers, and the
  EMA update and the sample grids read them directly.
* It also runs on the CPU (gloo). Lightning refuses the strategy name "fsdp" without a GPU (it checks for its
  own class exactly, so this subclass passes), and torch's FSDP works on the CPU when it is given the CPU as
  its device: that is how multi-process sharded training is tested on machines without GPUs.
* A full (single-file) checkpoint is checked with ``torch.load(weights_only=True)`` before Lightning's lazy
  loader (a plain unpickler) reads it, so resuming never runs code from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch.strategies as pl_strategies
import torch
from torch import nn

from ldm.weights_io import CheckpointError


class FSDPStrategy(pl_strategies.FSDPStrategy):
    """
    wrap_modules: import paths of the module classes that become FSDP units (the U-Net's blocks by default).
    Everything else (sharding_strategy, state_dict_type, timeout, cpu_offload, ...) is Lightning's.
    """

    def __init__(self, wrap_modules: Iterable[str] = ("ldm.modules.unet.TimestepSequential",), **kwargs: Any):
        if "auto_wrap_policy" not in kwargs and wrap_modules:
            kwargs["auto_wrap_policy"] = {hydra.utils.get_class(path) for path in wrap_modules}
        super().__init__(**kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)  # wrapped by the user already
        kwargs = dict(self.kwargs)
        ignored = list(getattr(model, "fsdp_ignored_modules", lambda: [])())
        if ignored:
            kwargs["ignored_modules"] = ignored + list(kwargs.get("ignored_modules") or [])
        # FSDP needs the device it runs on: a GPU by index (as Lightning passes it), or the CPU as a device.
        device_id = self.root_device if self.root_device.type == "cpu" else self.root_device.index
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=device_id,
            **kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    @contextmanager
    def _cpu_autocast(self) -> Iterator[None]:
        # Lightning's FSDP precision autocasts as CUDA does, which leaves CPU tensors alone: with bf16-mixed on
        # the CPU (gloo runs) the float32 latents would meet the units' bf16 weights. On a GPU this adds nothing.
        dtype = getattr(self.mixed_precision_config, "param_dtype", None)
        if self.root_device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dtype):
                yield
        else:
            yield

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._cpu_autocast():
            return super().training_step(*args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._cpu_autocast():
            return super().validation_step(*args, **kwargs)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        if path.is_file():
            try:
                # mmap: the tensors are not read, only the pickle is checked; a pickle that would run code fails.
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - UnpicklingError, zip errors, truncated files
                raise CheckpointError(f"cannot resume from {path}: not a weights-only checkpoint "
                                      f"({type(e).__name__}: {str(e).splitlines()[0]})") from e
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


__all__ = ["FSDPStrategy"]
