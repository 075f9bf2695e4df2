"""Every experiment under every trainer preset, at precision 32 and bf16-mixed: composed as a user composes them
(the preset, mapped to the CPU by `trainer.accelerator=cpu` and the devices count alone), trained a few steps by
train.py, and the checkpoint it leaves loaded by the next program, as a user would chain them:

    emoji_autoencoder ─ last.ckpt → emoji_ldm (autoencoder.ckpt_path) ─ last.ckpt → dreambooth (init_from)
                                                                                       ─ last.ckpt → sample.py

Each run trains 3 steps with checkpoints every 2 (the final step is not on the interval: last.ckpt must still hold
it) and the default log interval of 10 steps (longer than the run: its metrics must still be written).

Single-process presets (`trainer=gpu` on the CPU) run in the default suite; the two-process presets (ddp, fsdp:
gloo, about a minute per chain) are marked slow: `python -m pytest -m slow tests/test_matrix.py`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from cli import TINY_DATA, TINY_LDM, run
from PIL import Image

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
STEPS = 3
# The chain a user runs on the built-in data. The other experiments have their own runs, under the default preset
# (the SD recipes: tests/test_recipes.py; shapes_*: tests/test_attention_benchmark.py), and
# tests/test_train.py::test_every_experiment_composes_and_is_smoke_tested checks that each has one.
EXPERIMENTS = ("emoji_autoencoder", "emoji_ldm", "dreambooth")
# TINY_DATA minus its log interval: the run must log its final step with the default interval.
DATA = [o for o in TINY_DATA if not o.startswith("trainer.log_every_n_steps")]
RUN = [f"trainer.max_steps={STEPS}", "callbacks.model_checkpoint.every_n_train_steps=2"]
PRESETS = {
    "gpu": ["trainer=gpu", "trainer.accelerator=cpu"],
    "ddp": ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
    "fsdp": ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"],
}
COMBINATIONS = [pytest.param(preset, precision, id=f"{preset}-{precision}",
                             marks=[pytest.mark.slow] if preset != "gpu" else [])
                for preset in PRESETS for precision in ("32", "bf16-mixed")]


def _instance_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        image = np.full((32, 32, 3), 255, np.uint8)
        image[8 + i : 24 + i, 8:24] = (200, 30, 30)
        Image.fromarray(image).save(folder / f"subject_{i}.png")
    return folder


def _check_run(out: Path, loss_key: str) -> None:
    checkpoints = out / "checkpoints"
    ckpt = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS, "last.ckpt does not hold the final step"
    assert (checkpoints / f"step_{STEPS:06d}.ckpt").is_file()
    with open(out / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(loss_key)]
    assert rows and max(int(r["step"]) for r in rows) == STEPS - 1, "the final step's metrics were not written"


def _sample(ckpt: Path, out: Path) -> None:
    run("sample.py", f"ckpt={ckpt}", "prompt=owl", "n=1", "steps=2", f"out={out}", "progress=false", env=ONE_THREAD)
    image = Image.open(out / "0000.png")
    assert image.size == (32, 32)


@pytest.mark.parametrize("preset, precision", COMBINATIONS)
def test_experiment_chain_under_preset(preset, precision, tmp_path, data_dir):
    common = [*PRESETS[preset], f"trainer.precision={precision}", f"paths.data_dir={data_dir}", *RUN]
    ae = tmp_path / "ae"
    run("train.py", "experiment=emoji_autoencoder", *common, *DATA, f"hydra.run.dir={ae}", env=ONE_THREAD)
    _check_run(ae, "train/rec_loss")

    ldm = tmp_path / "ldm"
    proc = run("train.py", "experiment=emoji_ldm", *common, *DATA, *TINY_LDM, "callbacks.sample_images.every_n_steps=0",
               f"autoencoder.ckpt_path={ae / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={ldm}", env=ONE_THREAD)
    _check_run(ldm, "train/loss")
    assert "sampling a grid of 2 images (2 ddim steps) at step 3" in proc.stdout + proc.stderr  # said, not silent

    # DreamBooth from the emoji model (its checkpoint loaded by init_from), without data.resolution: it trains (and
    # makes its class images) at the base model's 32 px.
    booth = tmp_path / "dreambooth"
    run("train.py", "experiment=dreambooth", *common, f"init_from={ldm / 'checkpoints' / 'last.ckpt'}",
        f"instance_data={_instance_images(tmp_path / 'instance')}", 'instance_prompt="a sks emoji"',
        'class_prompt="an emoji"', "num_class_images=2", "data.progress=false", "model.sampling.steps=2",
        "callbacks.sample_images.steps=2", "callbacks.sample_images.n_per_prompt=1",
        "trainer.enable_progress_bar=false", f"hydra.run.dir={booth}", env=ONE_THREAD)
    _check_run(booth, "train/loss")
    class_images = list((data_dir / "class_images").rglob("*.png"))
    assert class_images and all(Image.open(p).size == (32, 32) for p in class_images)
    _sample(booth / "checkpoints" / "last.ckpt", tmp_path / "dreambooth_samples")
