"""OmegaConf resolvers the configs use; registered by the entry points before a config is resolved.

    ${if:COND,A,B}         A when COND is true, else B: defaults that depend on another setting, e.g. DreamBooth's
                           learning rate (2e-6 with the text encoder trained, 5e-6 without)
    ${nonnull:A,B,...}     the list of the values that are not null, e.g. sample prompts where one is optional
    ${ldm_path:REL}        the absolute path of a file shipped inside the ldm package, e.g. reference statistics
    ${mul:A,B}             A·B, e.g. a learning rate that grows with the global batch (MLPerf: 1.25e-7 per image)
    ${ceil_div:A,B}        ⌈A / B⌉, e.g. the optimizer steps that hold 512,000 images at a given global batch
    ${per_rank_batch:GLOBAL,DEVICES,NODES,ACCUMULATE}
                           the batch each process loads so that one optimizer step sees GLOBAL images:
                           GLOBAL / (DEVICES · NODES · ACCUMULATE), or an error naming the keys when it does
                           not divide (the recipes in configs/experiment/ set data.batch_size this way)
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import ListConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive whole number here (it sets the per-process batch), got {value!r}")
    return value


def per_rank_batch(global_batch, devices, num_nodes=1, accumulate=1) -> int:
    """The batch of one process when ``global_batch`` images make one optimizer step over all processes."""
    global_batch = _positive_int(global_batch, "global_batch_size")
    devices = _positive_int(devices, "trainer.devices")
    num_nodes = _positive_int(num_nodes, "trainer.num_nodes")
    accumulate = _positive_int(accumulate, "trainer.accumulate_grad_batches")
    split = devices * num_nodes * accumulate
    if global_batch % split:
        raise ValueError(
            f"global_batch_size={global_batch} does not divide over trainer.devices × trainer.num_nodes × "
            f"trainer.accumulate_grad_batches = {devices} × {num_nodes} × {accumulate}: change one of them, or "
            f"set data.batch_size (per process) yourself")
    return global_batch // split


def ceil_div(a, b) -> int:
    """⌈a / b⌉; exact for whole numbers (no float rounding of large image counts)."""
    if isinstance(a, int) and isinstance(b, int):
        return -(-a // b)
    return int(math.ceil(a / b))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("if"):
        OmegaConf.register_new_resolver("if", lambda condition, a, b: a if condition else b)
    if not OmegaConf.has_resolver("nonnull"):
        # A ListConfig, not a list: OmegaConf.resolve cannot store a plain list where another key points to it.
        OmegaConf.register_new_resolver("nonnull", lambda *values: ListConfig([v for v in values if v is not None]))
    if not OmegaConf.has_resolver("ldm_path"):
        OmegaConf.register_new_resolver("ldm_path", lambda rel: str(PACKAGE_DIR / rel))
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda a, b: a * b)
    if not OmegaConf.has_resolver("ceil_div"):
        OmegaConf.register_new_resolver("ceil_div", ceil_div)
    if not OmegaConf.has_resolver("per_rank_batch"):
        OmegaConf.register_new_resolver("per_rank_batch", per_rank_batch)
