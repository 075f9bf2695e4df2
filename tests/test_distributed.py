"""Multi-process training on the CPU (gloo): DDP and FSDP against one process; strategy and SLURM configs;
how a failing rank ends a run.

The equivalence runs use deterministic batches that split across ranks (tests/fixed_data.py) and
model.noise_seeding=per_sample, so one process with batch 4 and two with batch 2 draw the same t, noise,
posterior noise and caption dropout for every sample. With SGD the runs then agree to float32 rounding: the
only difference is the order in which the gradient's terms are summed (the all-reduce adds two half-batch
means). Measured: 7.5e-9 largest weight difference, 6e-8 relative loss difference; the tolerances below are
about 100× that, far below a single step's change of the weights (~1e-4 per element). (With AdamW the same
runs differ by up to 2.5e-3 after three steps at lr 0.01: Adam divides each gradient by its own magnitude, so
rounding noise in near-zero gradient entries becomes a full-size step of either sign; that is a property of
the optimizer, not of the parallelism, hence SGD here.)
"""

from __future__ import annotations

import datetime
import glob
import json
import time
from pathlib import Path

import pytest
import tiny_ldm
import torch
from cli import ROOT, TESTS, run

EQUIVALENCE = [
    "experiment=emoji_ldm", f"hydra.searchpath=[pkg://ldm,file://{TESTS / 'configs'}]", "data=fixed", "data.resolution=8",
    "data.global_batch_size=4", "data.steps=3", "trainer.max_steps=3",
    "model.unet.model_channels=32", "model.unet.num_heads=2", "model.lr_schedule.warmup_steps=0",
    "model.noise_seeding=per_sample", "model.ucg_rate=0.5", "model.ema.decay=0.5",
    "model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=0.1", "~model.optimizer.betas",
    "~model.optimizer.eps", "+model.optimizer.momentum=0.9", "trainer.gradient_clip_val=0.5",
    "callbacks.sample_images.every_n_steps=0", "callbacks.sample_images.at_train_end=false",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
]
CPU2 = ["trainer.accelerator=cpu", "trainer.devices=2"]


def train(out: Path, autoencoder: Path, *overrides: str, check: bool = True):
    return run("train.py", *EQUIVALENCE, f"hydra.run.dir={out}", f"autoencoder.ckpt_path={autoencoder}",
               "+callbacks.record_loss._target_=run_probes.RecordLoss", f"+callbacks.record_loss.out={out / 'loss'}",
               *overrides, check=check, env={"OMP_NUM_THREADS": "1"})  # tiny model: threads only contend


def global_losses(out: Path) -> list[float]:
    """The loss of each global batch: the batch-size-weighted mean of the ranks' losses."""
    rows = [json.loads(line) for f in glob.glob(str(out / "loss" / "*.jsonl")) for line in open(f)]
    steps = sorted({r["step"] for r in rows})
    def mean(step: int) -> float:
        return sum(r["loss"] * r["batch"] for r in rows if r["step"] == step) / sum(
            r["batch"] for r in rows if r["step"] == step)

    return [mean(s) for s in steps]


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory) -> Path:
    return tiny_ldm.autoencoder_ckpt(tmp_path_factory.mktemp("ae"))


@pytest.fixture(scope="module")
def single(tmp_path_factory, autoencoder) -> Path:
    out = tmp_path_factory.mktemp("single")
    train(out, autoencoder)
    return out


def assert_same_training(single: Path, parallel: Path) -> None:
    a, b = global_losses(single), global_losses(parallel)
    assert len(a) == len(b) == 3 and a[0] != a[2]
    assert b == pytest.approx(a, rel=1e-6, abs=0)
    ckpt_a = torch.load(single / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt_b = torch.load(parallel / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt_a["global_step"] == ckpt_b["global_step"] == 3
    trained = [k for k in ckpt_a["state_dict"] if k.startswith(("unet.", "ema.model."))]
    assert set(ckpt_a["state_dict"]) == set(ckpt_b["state_dict"]) and trained
    worst = max(float((ckpt_a["state_dict"][k] - ckpt_b["state_dict"][k]).abs().max()) for k in trained)
    assert worst < 1e-6, worst


def test_ddp_two_processes_train_like_one(single, autoencoder, tmp_path):
    train(tmp_path, autoencoder, "trainer=ddp", *CPU2)
    assert len(glob.glob(str(tmp_path / "loss" / "*.jsonl"))) == 2
    assert_same_training(single, tmp_path)


def test_fsdp_two_processes_train_like_one(single, autoencoder, tmp_path):
    train(tmp_path, autoencoder, "trainer=fsdp", *CPU2)
    assert len(glob.glob(str(tmp_path / "loss" / "*.jsonl"))) == 2
    assert_same_training(single, tmp_path)  # sharded weights, EMA, clipping and a gathered full checkpoint


def compose(*overrides: str, hydra_config: bool = False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("train", overrides=["experiment=emoji_ldm", "autoencoder.ckpt_path=x", *overrides],
                             return_hydra_config=hydra_config)


def test_process_group_timeout_is_a_config_value():
    import hydra

    from ldm.training.strategies import FSDPStrategy

    ddp = hydra.utils.instantiate(compose("trainer=ddp", "trainer.strategy.timeout.minutes=7").trainer.strategy)
    assert ddp._timeout == datetime.timedelta(minutes=7)
    fsdp = hydra.utils.instantiate(compose("trainer=fsdp", "trainer.strategy.timeout.minutes=3").trainer.strategy)
    assert isinstance(fsdp, FSDPStrategy) and fsdp._timeout == datetime.timedelta(minutes=3)
    from ldm.modules.unet import TimestepSequential

    assert fsdp.kwargs["auto_wrap_policy"]._module_classes == {TimestepSequential}


def test_slurm_launcher_follows_the_trainer():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=4",
                  hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (4, 8, 8)
    assert "export SLURM_KILL_BAD_EXIT=1" in launcher.setup


@pytest.mark.slow
def test_a_failing_rank_ends_the_whole_run(autoencoder, tmp_path):
    start = time.monotonic()
    proc = train(tmp_path, autoencoder, "trainer=ddp", *CPU2, "trainer.strategy.timeout.minutes=2",
                 "+callbacks.fail._target_=run_probes.FailOnRank", check=False)
    assert proc.returncode != 0
    assert "simulated failure on rank 1 at step 1" in proc.stdout + proc.stderr
    assert time.monotonic() - start < 110  # the peer learns at its next collective, not after the timeout


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(autoencoder, tmp_path):
    proc = train(tmp_path, autoencoder, "trainer=ddp", *CPU2, "model.nonfinite_loss=skip",
                 "+callbacks.poison._target_=run_probes.PoisonBatch")
    output = proc.stdout + proc.stderr
    assert "non-finite loss on another rank at step 1" in output  # rank 0: finite itself, skips with rank 1
    assert "non-finite loss nan at step 1" in output
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_fsdp_resumes_from_its_full_checkpoint(autoencoder, tmp_path):
    first = tmp_path / "first"
    train(first, autoencoder, "trainer=fsdp", *CPU2)
    resumed = tmp_path / "resumed"
    train(resumed, autoencoder, "trainer=fsdp", *CPU2, "trainer.max_steps=5", "data.steps=5",
          f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    ckpt = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5 and len(ckpt["rng_states"]) == 2
    assert sorted({json.loads(line)["step"] for f in glob.glob(str(resumed / "loss" / "*.jsonl"))
                   for line in open(f)}) == [4, 5]
