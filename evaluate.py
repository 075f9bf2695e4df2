"""Measure saved checkpoints: `python evaluate.py ckpt=PATH [prompts=FILE] [ref_stats=FILE.npz] [key=value ...]`.

Samples a fixed prompt set with fixed seeds (DDIM, guidance, EMA weights) from a checkpoint, or from each
checkpoint of a folder in step order, and measures the images as the training callback does (FID and KID
against reference statistics, CLIP score, the emoji demo's top-1 rate; configs/evaluation). Writes a JSON
report, and for a folder one CSV row per checkpoint. Timing a training run (as MLPerf does) leaves evaluation
out of it: train with the callback off and measure the checkpoints here afterwards.

Under torchrun (`torchrun --nproc_per_node N evaluate.py ...`) the prompts are split over the processes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.cli_errors import friendly_errors
from ldm.config_resolvers import register_resolvers
from ldm.evaluation.prompts import read_prompts as read_file
from ldm.pipeline import LatentDiffusionPipeline

log = logging.getLogger("evaluate")
register_resolvers()

COLUMNS = ["ckpt", "step", "images_seen", "fid", "kid", "kid_std", "clip_score", "top1", "num_images", "seconds"]


def read_prompts(path: str | None, pipe) -> list[str]:
    if path:
        return read_file(path)  # one per line, or a .tsv/.csv with a caption column (MLPerf's COCO subset)
    prompts = list(pipe.defaults.get("prompts") or [])
    if not prompts:
        raise ValueError("the checkpoint has no sampling.prompts: give prompts=FILE (one prompt per line)")
    return prompts


def checkpoints(path: Path) -> list[Path]:
    """The checkpoints to evaluate: the file itself, or a folder's *.ckpt in step order (last.ckpt only when no
    step_*.ckpt has its step)."""
    files = sorted(path.glob("*.ckpt")) if path.is_dir() else []
    if not files:
        return [path]  # one checkpoint: a file, an export or a diffusers folder
    steps = {f: checkpoint_info(f)["step"] for f in files}
    named = {steps[f] for f in files if f.name != "last.ckpt"}
    chosen = [f for f in files if f.name != "last.ckpt" or steps[f] not in named]
    for f in files:
        if f not in chosen:
            log.info("skipping %s: the same step (%s) as another checkpoint", f.name, steps[f])
    return sorted(chosen, key=lambda f: (steps[f] if steps[f] is not None else -1, f.name))


def checkpoint_info(path: Path) -> dict:
    """The training step and image count a Lightning checkpoint was written at (None where it does not say)."""
    if path.is_dir() or path.suffix != ".ckpt":
        return {"step": None, "images_seen": None}
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    images = next((state.get("images_seen") for key, state in (ckpt.get("callbacks") or {}).items()
                   if "EvaluateImages" in str(key) and isinstance(state, dict)), None)
    return {"step": ckpt.get("global_step"), "images_seen": images}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and torch.distributed.is_initialized():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def init_distributed() -> int:
    """Joins torchrun's process group when there is one; returns this process's rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def evaluate(cfg: DictConfig) -> dict:
    target = Path(cfg.ckpt).expanduser()
    if not target.exists():
        raise FileNotFoundError(f"ckpt not found: {target}")
    rank = init_distributed()
    evaluator = hydra.utils.instantiate(cfg.evaluation)
    if not evaluator.has_measures:
        raise ValueError("no measure configured: set ref_stats=... with evaluation.inception.weights=..., "
                         "evaluation.clip.weights=..., or evaluation.nearest={shards:...,resolution:...}")
    if rank == 0:
        for line in evaluator.status():
            log.info("%s", line)
    device = pick_device(cfg.device)
    evaluator.prepare(device)
    rows = []
    for path in checkpoints(target):
        pipe = LatentDiffusionPipeline.from_checkpoint(path, use_ema=cfg.use_ema, device=device)
        prompts = read_prompts(cfg.prompts, pipe)
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            metrics = evaluator.evaluate_pipeline(pipe, prompts)
        row = {"ckpt": str(path), **checkpoint_info(path), **metrics}
        rows.append(row)
        if rank == 0:
            log.info("%s: %s", path.name, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    report = {"checkpoints": rows, "measures": evaluator.status(),
              "settings": OmegaConf.to_container(cfg.evaluation, resolve=True),
              "prompts": cfg.prompts or "the checkpoint's sampling.prompts"}
    if rank == 0:
        write_report(report, target, cfg.out)
    return report


def write_report(report: dict, target: Path, out: str | None) -> None:
    folder = target.is_dir() and any(target.glob("*.ckpt"))
    directory = Path(out) if out else (target if folder else target.parent)
    directory.mkdir(parents=True, exist_ok=True)
    stem = "evaluation" if folder or out else f"{target.name}.evaluation"
    json_path = directory / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    csv_path = directory / f"{stem}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(report["checkpoints"])
    log.info("report: %s, %s", json_path, csv_path)


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
@friendly_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
