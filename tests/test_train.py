"""End to end: the real `train.py` and `sample.py` on tiny settings of the built-in emoji experiments."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli import ROOT, TINY_DATA, TINY_LDM, run
from PIL import Image


def test_stage1_writes_checkpoint_metrics_and_images(stage1):
    assert (stage1 / "checkpoints" / "last.ckpt").is_file()
    metrics = (stage1 / "csv" / "metrics.csv").read_text()
    for name in ("train/rec_loss", "train/kl_loss", "val/psnr", "train/lr"):
        assert name in metrics, name
    assert list((stage1 / "images").glob("train_reconstructions_*.png"))
    assert (stage1 / "emoji_autoencoder.log").is_file()


def test_stage2_checkpoint_holds_ema_and_no_frozen_text_encoder(stage2):
    ckpt = torch.load(stage2 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("ema.model.") for k in keys)
    assert any(k.startswith("autoencoder.") for k in keys)
    assert not any(k.startswith("conditioner.") for k in keys)
    assert ckpt["global_step"] == 4
    # The EMA differs from the raw weights after training (it is a real average, not a copy).
    unet = {k[5:]: v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}
    ema = {k[10:]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.model.")}
    assert unet.keys() == ema.keys()
    assert any(not torch.equal(unet[k], ema[k]) for k in unet)


def test_stage2_freezes_everything_but_the_unet(stage1):
    from ldm.training.diffusion_module import DiffusionModule

    module = DiffusionModule.from_settings(dict(
        unet=dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                  num_heads=2, context_dim=256),
        conditioner={"_target_": "ldm.conditioning.text.FrozenOpenCLIPTextEncoder", "arch": "ViT-S-32-alt"},
        schedule={}, autoencoder_ckpt=str(stage1 / "checkpoints" / "last.ckpt"), ema={"decay": 0.9},
    ))
    trainable = {id(p) for p in module.trainable_parameters()}
    assert trainable == {id(p) for p in module.unet.parameters()}
    assert not any(p.requires_grad for p in module.autoencoder.parameters())
    assert not any(p.requires_grad for p in module.conditioner.parameters())
    module.train()
    assert module.unet.training and not module.autoencoder.training and not module.conditioner.training


def test_wandb_offline_run_holds_sample_images(stage2):
    runs = list((stage2 / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((stage2).iterdir())
    images = list(runs[0].glob("files/media/images/samples_*.png"))
    assert images, sorted(str(p) for p in runs[0].rglob("*"))[:50]
    assert (runs[0] / f"run-{runs[0].name.split('-')[-1]}.wandb").is_file()


def test_resume_continues_step_count_and_restores_ema(stage2, stage1, data_dir, tmp_path):
    from run_probes import ema_checksum

    last = stage2 / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    out = tmp_path / "resumed"
    run("train.py", "experiment=emoji_ldm", f"hydra.run.dir={out}", f"paths.data_dir={data_dir}",
        f"autoencoder.ckpt_path={stage1 / 'checkpoints' / 'last.ckpt'}", *TINY_DATA, *TINY_LDM,
        "trainer.max_steps=6", f"ckpt_path={last}", "+callbacks.record_start._target_=run_probes.RecordStart",
        f"+callbacks.record_start.out={out / 'start.json'}")
    start = json.loads((out / "start.json").read_text())
    assert start["global_step"] == 4
    assert start["ema_num_updates"] == 4
    assert start["ema_checksum"] == pytest.approx(ema_checksum(saved["state_dict"]), rel=0, abs=1e-6)
    resumed = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 6


# Slow: train.py under trainer=ddp runs in the default suite already (tests/test_distributed.py), and the split
# by node is checked in-process with a real process group (tests/test_data.py::test_split_by_node_with_process_group).
@pytest.mark.slow
def test_ddp_two_cpu_processes_read_different_shards(stage1, data_dir, tmp_path):
    out = tmp_path / "ddp"
    run("train.py", "experiment=emoji_ldm", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        f"hydra.run.dir={out}", f"paths.data_dir={data_dir}", f"autoencoder.ckpt_path={stage1}/checkpoints/last.ckpt",
        *TINY_DATA, *TINY_LDM, "trainer.max_steps=3", "data.resampled=false", "data.epoch_length=null",
        "+callbacks.record_keys._target_=run_probes.RecordKeys", f"+callbacks.record_keys.out={out / 'keys'}")
    keys = [set((out / "keys" / f"keys_rank{r}.txt").read_text().split()) for r in (0, 1)]
    assert all(len(k) >= 4 for k in keys)
    assert not keys[0] & keys[1], "both ranks trained on the same samples"
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3


def _write_bad_shard(path: Path, good_image: bytes) -> None:
    """A shard with one good sample, one undecodable image and one sample without a caption."""
    import io

    def add(tar, name, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as tar:
        add(tar, "good.png", good_image)
        add(tar, "good.txt", b"a good sample")
        add(tar, "corrupt.jpg", os.urandom(300))
        add(tar, "corrupt.txt", b"a corrupt image")
        add(tar, "nocaption.png", good_image)


def test_corrupt_image_and_missing_caption_are_counted_and_training_goes_on(data_dir, tmp_path):
    import io

    shards = tmp_path / "shards"
    shards.mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(buf, format="PNG")
    for i in range(3):
        _write_bad_shard(shards / f"part-{i:02d}.tar", buf.getvalue())
    out = tmp_path / "run"
    proc = run("train.py", "experiment=emoji_autoencoder", "data=shards", f"data.train_shards={shards}",
               "data.resolution=32", "data.batch_size=1", "data.num_workers=0", "data.resampled=false",
               "data.epoch_length=null", "trainer.max_steps=-1", "trainer.max_epochs=1",
               "trainer.enable_progress_bar=false", f"hydra.run.dir={out}")
    log = (out / "emoji_autoencoder.log").read_text() + proc.stderr
    assert "train/skipped/corrupt_image=3" in log and "train/skipped/no_caption=3" in log, log[-3000:]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3  # the three good samples, one per batch


def _sample(ckpt: Path, out: Path, *overrides: str) -> list[np.ndarray]:
    run("sample.py", f"ckpt={ckpt}", f"out={out}", "n=2", "steps=3", "progress=false", *overrides)
    files = sorted(out.glob("0*.png"))
    assert (out / "grid.png").is_file() and (out / "metadata.jsonl").is_file()
    return [np.asarray(Image.open(f)) for f in files]


def test_sample_cli_is_seeded_and_guidance_matters(stage2, tmp_path):
    ckpt = stage2 / "checkpoints" / "last.ckpt"
    a = _sample(ckpt, tmp_path / "a", 'prompt="red apple"', "seed=0")
    b = _sample(ckpt, tmp_path / "b", 'prompt="red apple"', "seed=0")
    c = _sample(ckpt, tmp_path / "c", 'prompt="red apple"', "seed=1")
    d = _sample(ckpt, tmp_path / "d", 'prompt="red apple"', "seed=0", "cfg_scale=1")
    assert len(a) == 2 and a[0].shape == (32, 32, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), "same seed, different images"
    assert not any(np.array_equal(x, y) for x, y in zip(a, c)), "another seed, same images"
    assert not any(np.array_equal(x, y) for x, y in zip(a, d)), "cfg_scale 1 and 7.5 gave the same images"


def test_sample_cli_prompts_file_and_ddpm(stage2, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red apple\nsnowman\n\n")
    images = _sample(stage2 / "checkpoints" / "last.ckpt", tmp_path / "out", f"prompts_file={prompts}",
                     "sampler=ddpm")
    assert len(images) == 4
    meta = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in meta] == ["red apple", "red apple", "snowman", "snowman"]


def test_sample_cli_missing_checkpoint_is_one_clear_error(tmp_path):
    proc = run("sample.py", f"ckpt={tmp_path / 'missing.ckpt'}", "prompt=x", check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "checkpoint not found" in output and "missing.ckpt" in output
    assert "Traceback" not in output


def test_train_cli_unknown_experiment_is_one_clear_error():
    proc = run("train.py", "experiment=no_such_experiment", check=False)
    assert proc.returncode != 0
    assert "Could not find 'experiment/no_such_experiment'" in proc.stderr
    assert "emoji_ldm" in proc.stderr  # the available choices are listed
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["experiment=emoji_ldm"], "autoencoder.ckpt_path"),
        (["experiment=emoji_ldm", "autoencoder.ckpt_path=x", "model._target_=ldm.nope.Module"], "ldm.nope.Module"),
        (["data=nope"], "Available options in 'data'"),
    ],
    ids=["missing-value", "bad-target", "bad-group-option"],
)
def test_train_cli_config_errors_name_the_problem(overrides, expected, tmp_path):
    proc = run("train.py", *overrides, f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert expected in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_every_experiment_composes_and_is_smoke_tested():
    from hydra import compose, initialize_config_dir

    experiments = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
    # Each experiment must have a run in the test suite (here; dreambooth: tests/test_finetune.py; the Stable
    # Diffusion recipes: tests/test_recipes.py; shapes_*: tests/test_attention_benchmark.py); add one when adding
    # an experiment.
    smoke_tested = {"emoji_autoencoder", "emoji_ldm", "dreambooth", "shapes_autoencoder", "shapes_ldm",
                    "sd2_base_256", "sd2_v_512", "sd_autoencoder_f8", "sd_finetune_512"}
    assert set(experiments) == smoke_tested
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        for name in experiments:
            cfg = compose("train", overrides=[f"experiment={name}", "autoencoder.ckpt_path=x"],
                          return_hydra_config=True)
            assert cfg.task_name == name
            assert cfg.model._target_.startswith("ldm.training.")
            # On your own shards no part of a built-in dataset's builder may be left over (a data.build without
            # _target_ is not a builder).
            cfg = compose("train", overrides=[f"experiment={name}", "autoencoder.ckpt_path=x", "data=shards",
                                              "data.train_shards=x"])
            assert cfg.data.get("build") is None, (name, cfg.data.build)


def test_sample_cli_attention_tools(stage2, tmp_path):
    ckpt = stage2 / "checkpoints" / "last.ckpt"
    out = tmp_path / "edit"
    run("sample.py", f"ckpt={ckpt}", f"out={out}", "steps=3", "progress=false", 'prompt="red apple"',
        'target_prompt="green apple"', "edit=replace", "attention_maps=true")
    assert Image.open(out / "edit_0.png").width > Image.open(out / "edit_0.png").height  # source | edit
    saved = torch.load(out / "attention_0.pt", weights_only=True)
    assert saved["labels"] == ["red", "apple"] and saved["maps"].shape[0] == 2
    assert (out / "attention_0.png").is_file()

    out = tmp_path / "excite"
    run("sample.py", f"ckpt={ckpt}", f"out={out}", "steps=3", "progress=false", 'prompt="red apple and snowman"',
        "attend_excite.tokens=[apple,snowman]", "sampler=dpmpp_2m")
    record = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert record["attend_excite_tokens"] == ["apple", "snowman"] and len(record["losses"]) >= 1
    assert (out / "0000.png").is_file()


def test_sample_cli_reweight_needs_no_target_prompt(stage2, tmp_path):
    out = tmp_path / "reweight"
    run("sample.py", f"ckpt={stage2 / 'checkpoints' / 'last.ckpt'}", f"out={out}", "steps=2", "progress=false",
        'prompt="red apple"', "edit=reweight", "edit_words=[apple]", "edit_weight=2")
    record = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert record["target_prompt"] == "red apple" and (out / "edit_0.png").is_file()


def test_shards_with_nothing_usable_stop_with_one_clear_error(tmp_path):
    import io

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "bad-00.tar", "w") as tar:
        for i in range(3):
            for name, data in ((f"s{i}.jpg", os.urandom(200)), (f"s{i}.txt", b"caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    proc = run("train.py", "experiment=emoji_autoencoder", "data=shards", f"data.train_shards={shards}",
               "data.resolution=32", "data.batch_size=2", "data.num_workers=1", "data.resampled=false",
               "data.epoch_length=null", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
               f"hydra.run.dir={tmp_path / 'run'}", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "data error" in output and "bad-00.tar" in output, output[-2000:]
    assert "Traceback" not in output


def test_colour_script_measures_a_stage1_run(stage1):
    """scripts/autoencoder_colour.py on the checkpoint train.py wrote: tables and RESULT lines in range."""
    proc = run("scripts/autoencoder_colour.py", "--ckpt", str(stage1 / "checkpoints" / "last.ckpt"), "--name", "t")
    results = {line[len("RESULT "):].split("=")[0]: float(line.split("=")[1])
               for line in proc.stdout.splitlines() if line.startswith("RESULT ")}
    assert "| hue of the input |" in proc.stdout and "| flat square |" in proc.stdout
    assert 0 < results["t_psnr"] < 60 and 0 <= results["t_chroma_ratio"] < 5 and 0 <= results["t_hue_error"] <= 180
    assert {"t_colour_mae", "t_squares_colour_mae", "t_chroma_ratio_red", "t_colour_mae_white"} <= results.keys()
