"""Real runs, as a user runs them: train.py and sample.py as subprocesses on tar shards, killed with SIGKILL in the
middle of a step and in the middle of a save and resumed, fed partly broken shards, driven to diverge, given bad
values. What each test checks is what the user is left with: the checkpoint, the metrics, the error line."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli import ROOT, TESTS, TINY_DATA, TINY_LDM, run

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
MAX_STEPS = 12
EVERY = 3  # checkpoint interval
# A plain pass over 32 emoji (8 steps an epoch): a resumed run skips exactly what was trained, so an interrupted
# and resumed run can be compared with one never interrupted, number for number.
RESUMABLE = [*TINY_DATA, *TINY_LDM, "data.resampled=false", "data.epoch_length=null", f"trainer.max_steps={MAX_STEPS}",
             f"callbacks.model_checkpoint.every_n_train_steps={EVERY}", "callbacks.sample_images.every_n_steps=0",
             "callbacks.sample_images.at_train_end=false"]


def _ldm(stage1: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["experiment=emoji_ldm", f"hydra.run.dir={out}", f"paths.data_dir={data_dir}",
            f"autoencoder.ckpt_path={stage1 / 'checkpoints' / 'last.ckpt'}", *extra]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice: {sorted(steps)}"
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


def _ema(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.model.")}


@pytest.fixture(scope="module")
def uninterrupted(stage1, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run("train.py", *_ldm(stage1, data_dir, out, *RESUMABLE), env=ONE_THREAD)
    return out


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _step(path: Path) -> int:
    try:
        return int(path.read_text() or -1)
    except (FileNotFoundError, ValueError):
        return -1


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the moment to kill never came")
        time.sleep(0.0005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _after_kill(checkpoints: Path, killed_at: int) -> int:
    """What the user has after a kill: a whole last.ckpt, at most one checkpoint interval behind, whose EMA made
    one update per optimizer step. Returns its step."""
    saved = _load(checkpoints / "last.ckpt")
    assert killed_at - EVERY <= saved["global_step"] <= killed_at and saved["global_step"] % EVERY == 0
    assert int(saved["state_dict"]["ema.num_updates"]) == saved["global_step"]
    return saved["global_step"]


def test_killed_twice_and_resumed_ends_as_if_never_interrupted(stage1, data_dir, uninterrupted, tmp_path):
    out, step_file = tmp_path / "run", tmp_path / "step"
    checkpoints, last = out / "checkpoints", out / "checkpoints" / "last.ckpt"
    # Every save carries a 64 MB padding tensor: writing one takes long enough to land a kill inside it.
    probes = ["+callbacks.step_file._target_=run_probes.StepFile", f"+callbacks.step_file.out={step_file}",
              "+callbacks.slow_save._target_=run_probes.PaddedSave", "+callbacks.slow_save.megabytes=64"]

    # 1. SIGKILL in the middle of a step: between the saves at steps 6 and 9.
    proc = _start(_ldm(stage1, data_dir, out, *RESUMABLE, *probes))
    _kill_when(proc, lambda: _step(step_file) >= 7)
    assert _after_kill(checkpoints, _step(step_file)) == 6
    assert not list(checkpoints.glob(".*.tmp-*"))

    # 2. Resumed, then SIGKILL in the middle of the save at step 9: its temporary file exists, the rename has not
    # happened: last.ckpt is still the whole checkpoint of step 6.
    proc = _start(_ldm(stage1, data_dir, out, *RESUMABLE, *probes, f"ckpt_path={last}"))
    _kill_when(proc, lambda: _step(step_file) >= 9 and any(checkpoints.glob(".*.tmp-*")))
    assert _after_kill(checkpoints, _step(step_file)) == 6
    assert list(checkpoints.glob(".*.tmp-*"))

    # 3. Resumed to the end.
    run("train.py", *_ldm(stage1, data_dir, out, *RESUMABLE, f"ckpt_path={last}"), env=ONE_THREAD)
    final, reference = _load(last), _load(uninterrupted / "checkpoints" / "last.ckpt")
    assert final["global_step"] == MAX_STEPS
    assert int(final["state_dict"]["ema.num_updates"]) == MAX_STEPS  # one EMA update per optimizer step
    for key, value in _ema(reference).items():
        assert torch.equal(_ema(final)[key], value), key  # bit for bit
    assert not list(checkpoints.glob(".*.tmp-*"))  # the killed save's temporary file was removed
    assert not list(checkpoints.glob("*-v[0-9]*.ckpt"))  # a step saved again replaced its file
    # The metrics history: the first runs' rows are kept, the steps they trained past their checkpoint replaced.
    losses, expected = _losses(out), _losses(uninterrupted)
    assert losses.keys() == expected.keys()
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [expected[s] for s in sorted(expected)],
                               rtol=1e-6)


def test_a_diverging_run_stops_and_keeps_the_checkpoint_from_before(stage1, data_dir, tmp_path):
    out = tmp_path / "spike"
    # nonfinite_loss=skip: the NaN losses that follow the blow-up are left to the divergence guard to judge (with
    # the default, raise, the first NaN stops the run at once, with the same advice).
    common = [*TINY_DATA, *TINY_LDM, "callbacks.model_checkpoint.every_n_train_steps=2",
              "callbacks.sample_images.every_n_steps=0", "callbacks.sample_images.at_train_end=false",
              "callbacks.divergence.patience=3", "data.epoch_length=400", "model.nonfinite_loss=skip"]
    proc = run("train.py", *_ldm(stage1, data_dir, out, *common, "trainer.max_steps=30",
                                 "+callbacks.spike._target_=run_probes.LearningRateSpike", "+callbacks.spike.step=4"),
               env=ONE_THREAD, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    found = re.search(r"training diverged at step (\d+): 3 suspect steps in a row since step (\d+)", output)
    assert found, output[-3000:]
    onset = int(found.group(2))
    last = out / "checkpoints" / "last.ckpt"
    assert f"The last checkpoint, {last} (step 4)" in output
    saved = _load(last)
    assert saved["global_step"] == 4 < onset
    weights = [v for k, v in saved["state_dict"].items() if k.startswith("unet.") and v.is_floating_point()]
    assert max(float(w.abs().max()) for w in weights) < 10.0  # the weights of a sane run, not blown up

    # As the error says: resume from it with a lower learning rate.
    run("train.py", *_ldm(stage1, data_dir, out, *common, "trainer.max_steps=6", f"ckpt_path={last}",
                          "model.optimizer.lr=1e-3"), env=ONE_THREAD)
    resumed = _load(last)
    assert resumed["global_step"] == 6
    assert all(bool(torch.isfinite(v).all()) for v in resumed["state_dict"].values() if v.is_floating_point())


def test_divergence_warn_goes_on_and_keeps_the_checkpoint_from_before(stage1, data_dir, tmp_path):
    out = tmp_path / "warn"
    proc = run("train.py", *_ldm(stage1, data_dir, out, *TINY_DATA, *TINY_LDM, "trainer.max_steps=10",
                                 "callbacks.model_checkpoint.every_n_train_steps=2", "data.epoch_length=400",
                                 "callbacks.sample_images.every_n_steps=0", "callbacks.sample_images.at_train_end=false",
                                 "callbacks.divergence.patience=3", "callbacks.divergence.action=warn",
                                 "model.nonfinite_loss=skip",
                                 "+callbacks.spike._target_=run_probes.LearningRateSpike", "+callbacks.spike.step=4"),
               env=ONE_THREAD)
    output = proc.stdout + proc.stderr
    assert "training diverged at step" in output and "training goes on" in output, output[-3000:]
    assert _load(out / "checkpoints" / "before_divergence.ckpt")["global_step"] == 4


def test_a_learning_rate_of_1e9_is_an_error_not_a_success(stage1, data_dir, tmp_path):
    out = tmp_path / "lr1e9"
    proc = run("train.py", *_ldm(stage1, data_dir, out, *TINY_DATA, *TINY_LDM, "trainer.max_steps=30",
                                 "model.optimizer.lr=1e9", "data.epoch_length=400",
                                 "callbacks.model_checkpoint.every_n_train_steps=1",
                                 "callbacks.sample_images.every_n_steps=0", "callbacks.sample_images.at_train_end=false"),
               env=ONE_THREAD, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert "training diverged at step" in output or "non-finite" in output, output[-3000:]
    assert "No checkpoint was written before it" in output
    assert not (out / "checkpoints" / "last.ckpt").exists()  # nothing from after the first (diverging) step


@pytest.mark.parametrize(
    "script, overrides, expected, not_reached",
    [
        ("train.py", ["trainer.max_steps=abc"], "trainer.max_steps must be an integer >= 1", "Instantiating model"),
        ("train.py", ["data.resolution=60"], "data.resolution=60 is not a multiple of 8 (the autoencoder by 4 and "
                                             "the U-Net by 2 downsample it): use 56 or 64", "Starting training"),
        ("sample.py", ["n=0", "cfg_scale=-1"], "n (images per prompt) must be an integer >= 1, got 0; cfg_scale "
                                               "must be a number >= 0 (1: no guidance, 0: unconditional), got -1",
         "loaded"),
        ("sample.py", ["ckpt=RANDOM"], "is not a readable checkpoint: not a torch file or .safetensors", "loaded"),
    ],
    ids=["max_steps", "resolution", "n-and-cfg_scale", "random-bytes-checkpoint"],
)
def test_bad_values_are_one_line_naming_the_problem(script, overrides, expected, not_reached, stage1, stage2,
                                                     data_dir, tmp_path):
    random_bytes = tmp_path / "random.ckpt"
    random_bytes.write_bytes(os.urandom(4096))
    overrides = [o.replace("RANDOM", str(random_bytes)) for o in overrides]
    if script == "train.py":
        args = _ldm(stage1, data_dir, tmp_path / "run", *TINY_DATA, *TINY_LDM, *overrides)
    else:
        args = [f"ckpt={stage2 / 'checkpoints' / 'last.ckpt'}", "prompt=owl", f"out={tmp_path}", *overrides]
    proc = run(script, *args, env=ONE_THREAD, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-2000:]
    assert expected in output, output[-2000:]
    assert "Traceback" not in output and not_reached not in output
