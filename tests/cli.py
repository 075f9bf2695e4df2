"""Running the real command-line programs in tests: `train.py`, `sample.py` as subprocesses, at tiny sizes, and
the README's commands as written, through bash."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# Small enough for seconds per run on a 2-core CPU; the same experiment files users run.
TINY_DATA = [
    "data.build.subset=32", "data.build.holdout=4", "data.build.shard_size=8", "data.batch_size=4",
    "data.epoch_length=8", "data.num_workers=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "trainer.check_val_every_n_epoch=1",
]
TINY_LDM = [
    "model.unet.model_channels=32", "model.unet.num_heads=2", "model.sampling.steps=3",
    "callbacks.sample_images.every_n_steps=2", "callbacks.sample_images.steps=2",
    "callbacks.sample_images.prompts=[red apple,snowman]",
    # a few large steps, so that the text context visibly changes the samples
    "model.lr_schedule.warmup_steps=0", "model.optimizer.lr=0.01", "model.ema.decay=0.5",
    # the evaluation callback measures once, at the end, on 2-step samples
    "evaluation.steps=2", "callbacks.evaluation.at_train_start=false",
]


def run(script: str, *overrides: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


# -- the README's commands -------------------------------------------------------------------------------------

README = ROOT / "README.md"
# What the README's torchrun line reads from the environment.
README_ENV = {"NNODES": "2", "NODE_RANK": "0", "MAIN_ADDR": "127.0.0.1"}


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks, continuation lines joined, comment lines left out."""
    commands, buffer, fence = [], [], None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence != "bash":
            continue
        buffer.append(line.rstrip().removesuffix("\\").strip())
        if not line.rstrip().endswith("\\"):
            command = " ".join(buffer).strip()
            buffer = []
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def readme_command(pattern: str) -> str:
    """The one README command that ``pattern`` (a regular expression) finds."""
    found = [c for c in readme_commands() if re.search(pattern, c)]
    assert len(found) == 1, f"{len(found)} README commands match {pattern!r}"
    return found[0]


def run_in_shell(project: Path, command: str, *small: str, check: bool = True) -> subprocess.CompletedProcess:
    """``command`` as the README has it (its trailing comment dropped), with ``small`` appended, through bash in
    ``project`` (a folder laid out as the README assumes)."""
    text = command.split(" #")[0] + "".join(" " + shlex.quote(o) for o in small)
    env = {**os.environ, **README_ENV, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", text], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"README command failed: {text}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc
