"""The Stable Diffusion recipes (configs/experiment/sd*.yaml): each composes to its anchor's numbers, names its
required files, and trains for two steps on the CPU as `train.py experiment=NAME` with sizes shrunk
(tests/tiny_recipes.py), on real webdataset shards and cached latents written here."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_train import ROOT, run

import tiny_recipes as R
from ldm.config_resolvers import register_resolvers

RECIPES = ("sd2_base_256", "sd2_v_512", "sd_autoencoder_f8", "sd_finetune_512")
REQUIRED = {
    "sd2_base_256": {"data.train_shards", "autoencoder.ckpt_path", "model.conditioner.pretrained"},
    "sd2_v_512": {"data.train_shards", "autoencoder.ckpt_path", "model.conditioner.pretrained"},
    "sd_autoencoder_f8": {"data.train_shards", "model.loss.lpips_vgg_path", "model.loss.lpips_lin_path"},
    "sd_finetune_512": {"init_from", "data.train_shards"},
}
# Filled in where the structure is checked (values only need to exist).
PLACEHOLDERS = {name: [f"{key}=x" for key in keys] for name, keys in REQUIRED.items()}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SD2_UNET_PARAMETERS = 865_910_724  # README "Reference configurations"
KL_F8_PARAMETERS = 83_653_863

register_resolvers()


def recipe(name: str, *overrides: str):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", *overrides])


def count_meta_parameters(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def train_module():
    """train.py as a module: its train() in this process (the CLI itself runs in the tests below)."""
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- the configs


def test_every_recipe_is_in_the_experiment_list():
    experiments = {p.stem for p in (ROOT / "configs" / "experiment").glob("sd*.yaml")}
    assert experiments == set(RECIPES)


def test_sd2_v_512_is_the_mlperf_reference():
    from ldm.modules.unet import UNetModel

    cfg = recipe("sd2_v_512", *PLACEHOLDERS["sd2_v_512"], "trainer.num_nodes=8")
    model = cfg.model
    assert count_meta_parameters(lambda: UNetModel(**model.unet)) == SD2_UNET_PARAMETERS
    assert model.unet.head_dim == 64 and model.unet.context_dim == 1024 and model.unet.use_linear_projection
    assert model.conditioner.arch == "ViT-H-14" and model.conditioner.layer == "penultimate"
    assert model.prediction_type == "v"
    assert dict(model.schedule) == {"beta_schedule": "scaled_linear", "num_timesteps": 1000, "linear_start": 0.00085,
                                    "linear_end": 0.012, "zero_terminal_snr": False}
    assert cfg.data._target_ == "ldm.data.latents.LatentDataModule" and cfg.data.resolution == 512
    # 512 images per step (32 nodes × 8 GPUs × 2 in MLPerf); 8 nodes of 8 GPUs load 8 each
    assert cfg.global_batch_size == 512 and cfg.data.batch_size == 8
    assert model.optimizer.lr == pytest.approx(1.25e-7 * 512)  # base_learning_rate × global batch
    assert (model.optimizer.betas, model.optimizer.weight_decay, model.optimizer.eps) == ([0.9, 0.999], 0.01, 1e-8)
    assert dict(model.lr_schedule) == {"kind": "constant", "warmup_steps": 1000, "min_lr_ratio": 0.0}
    assert model.ema is None and model.ucg_rate == 0.0 and cfg.trainer.gradient_clip_val is None
    # evaluation: every 512,000 images, DDIM 50 at guidance 8 with ViT-H-14's CLIP score; stop at the target
    evaluation = cfg.callbacks.evaluation
    assert evaluation.every_n_images == 512_000 and dict(evaluation.targets) == {"fid": 90.0, "clip_score": 0.15}
    assert (cfg.evaluation.steps, cfg.evaluation.sampler, cfg.evaluation.cfg_scale) == (50, "ddim", 8.0)
    assert cfg.evaluation.clip.arch == "ViT-H-14" and cfg.evaluation.n_per_prompt == 1
    assert cfg.callbacks.model_checkpoint.every_n_train_steps * cfg.global_batch_size == 512_000
    assert cfg.trainer.max_steps * cfg.global_batch_size == 5_120_000
    assert "wandb" in cfg.logger and cfg.trainer.strategy._target_.endswith("DDPStrategy")


def test_sd2_base_256_is_mosaics_sd2_base():
    from ldm.modules.unet import UNetModel

    cfg = recipe("sd2_base_256", *PLACEHOLDERS["sd2_base_256"], "trainer.num_nodes=8",
                 "trainer.accumulate_grad_batches=2")
    model = cfg.model
    assert count_meta_parameters(lambda: UNetModel(**model.unet)) == SD2_UNET_PARAMETERS
    assert model.prediction_type == "eps" and model.schedule.beta_schedule == "scaled_linear"
    assert model.conditioner.arch == "ViT-H-14" and model.conditioner.layer == "penultimate"
    assert cfg.data._target_ == "ldm.data.latents.LatentDataModule" and cfg.data.resolution == 256
    assert cfg.global_batch_size == 2048 and cfg.data.batch_size == 2048 // (8 * 8 * 2)
    assert model.optimizer.lr == 1e-4 and model.optimizer.weight_decay == 0.01
    assert dict(model.lr_schedule) == {"kind": "constant", "warmup_steps": 10_000, "min_lr_ratio": 0.0}
    assert model.ucg_rate == 0.1 and model.ema is None and cfg.trainer.gradient_clip_val is None
    assert cfg.trainer.max_steps * cfg.global_batch_size == 1_126_400_000
    assert cfg.callbacks.evaluation.every_n_images == 10_000 * 2048
    assert cfg.callbacks.model_checkpoint.every_n_train_steps == 10_000
    assert "wandb" in cfg.logger


def test_sd_autoencoder_f8_is_compvis_kl_f8():
    from ldm.modules.autoencoder import AutoencoderKL

    cfg = recipe("sd_autoencoder_f8", *PLACEHOLDERS["sd_autoencoder_f8"])
    model = cfg.model
    assert model._target_ == "ldm.training.autoencoder_module.AutoencoderModule"
    assert count_meta_parameters(lambda: AutoencoderKL(**model.autoencoder)) == KL_F8_PARAMETERS
    loss = model.loss
    assert (loss.rec_loss, loss.kl_weight, loss.perceptual_weight) == ("l1", 1e-6, 1.0)
    assert loss.disc_enabled and (loss.disc_start, loss.disc_weight, loss.disc_layers) == (50001, 0.5, 3)
    # 12 per GPU × 2 accumulated × 8 GPUs; base_learning_rate 4.5e-6 × that
    assert cfg.data.batch_size == 12 and cfg.trainer.accumulate_grad_batches == 2 and cfg.trainer.devices == 8
    assert model.lr == pytest.approx(4.5e-6 * 192) and list(model.betas) == [0.5, 0.9]
    assert cfg.data.resolution == 256 and cfg.data._target_ == "ldm.data.datamodule.ShardDataModule"
    assert cfg.callbacks.evaluation.heldout.shards is None  # data.val_shards: off until given
    assert "wandb" in cfg.logger


def test_sd_finetune_512_is_diffusers_text_to_image():
    cfg = recipe("sd_finetune_512", *PLACEHOLDERS["sd_finetune_512"])
    model = cfg.model
    assert cfg.data.resolution == 512 and cfg.data.flip_prob == 0.5 and not cfg.data.random_crop
    assert cfg.global_batch_size == 32 and cfg.data.batch_size == 4  # 8 GPUs
    assert model.optimizer.lr == 1e-5 and model.lr_schedule.kind == "constant" and model.lr_schedule.warmup_steps == 0
    assert model.ema.decay == 0.9999 and cfg.trainer.gradient_clip_val == 1.0 and model.ucg_rate == 0.0
    assert model.unet.gradient_checkpointing and cfg.trainer.max_steps == 15_000
    assert cfg.autoencoder.ckpt_path is None  # it comes with init_from
    assert "wandb" in cfg.logger


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_under_ddp_and_fsdp_across_nodes(name):
    for trainer, strategy in (("ddp", "DDPStrategy"), ("fsdp", "FSDPStrategy")):
        cfg = recipe(name, *PLACEHOLDERS[name], f"trainer={trainer}", "trainer.num_nodes=4")
        assert cfg.trainer.strategy._target_.endswith(strategy)
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 8 and cfg.trainer.num_nodes == 4
        # the global batch stays the recipe's: 4 × 8 processes share it
        split = 32 * cfg.trainer.accumulate_grad_batches
        assert cfg.data.batch_size * split == cfg.global_batch_size or cfg.global_batch_size < split


def test_global_batch_sets_the_per_process_batch_and_the_learning_rate():
    cfg = recipe("sd2_v_512", "global_batch_size=2048", "trainer.devices=8", "trainer.num_nodes=32")
    assert cfg.data.batch_size == 8 and cfg.model.optimizer.lr == pytest.approx(2.56e-4)  # train_32x08x08
    cfg = recipe("sd2_v_512", "trainer.devices=8", "trainer.accumulate_grad_batches=8")
    assert cfg.data.batch_size == 8
    assert cfg.callbacks.model_checkpoint.every_n_train_steps == 1000  # 512,000 images
    cfg = recipe("sd2_v_512", "trainer.devices=3")
    with pytest.raises(Exception, match=r"global_batch_size=512 does not divide over trainer.devices × "
                                        r"trainer.num_nodes × trainer.accumulate_grad_batches = 3 × 1 × 1"):
        cfg.data.batch_size  # noqa: B018 (resolving is the point)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_names_every_required_value_at_once(name, tmp_path):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="missing required value") as error:
        train_module().train(cfg)
    named = set(re.findall(r"([\w.]+) \((?:set|used by)", str(error.value)))
    assert named == REQUIRED[name], str(error.value)
    assert str(error.value).count("model.conditioner.pretrained") <= 2  # named once ("… (set …=...)")


# ------------------------------------------------------------------------------------------- two-step runs


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The local files the recipes require, made here: image shards, the shrunk ViT-H-14 text tower, LPIPS."""
    root = tmp_path_factory.mktemp("recipes")
    arch, text = R.sd2_text_tower(root / "text")
    vgg, lin = R.lpips_files(root / "lpips")
    return {"root": root, "shards": R.image_shards(root / "shards"), "holdout": R.image_shards(root / "holdout", n=2),
            "arch": arch, "text": text, "vgg": vgg, "lin": lin}


@pytest.fixture(scope="module")
def cached_latents(files) -> Path:
    """python -m ldm.data.cache_latents as a user runs it: the shrunk KL-f8 and text tower, float16."""
    from ldm.data.cache_latents import cache_latents

    conditioner = files["root"] / "conditioner.yaml"
    config = OmegaConf.load(ROOT / "configs" / "model" / "conditioner" / "sd2_open_clip_h14.yaml")
    config.arch = files["arch"]
    OmegaConf.save(config, conditioner)
    out = files["root"] / "latents"
    cache_latents(str(files["shards"]), out, str(R.autoencoder_f8_ckpt(files["root"])), resolution=64,
                  conditioner=str(conditioner), conditioner_pretrained=str(files["text"]), dtype="float16",
                  shard_size=4, num_workers=0)
    return out


def stage2_overrides(files: dict, cached_latents: Path) -> list[str]:
    return [*R.CPU, *R.STAGE2, *R.text_overrides(files["arch"], files["text"]), f"data.train_shards={cached_latents}",
            f"autoencoder.ckpt_path={R.autoencoder_f8_ckpt(files['root'])}", "trainer.max_steps=2"]


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name, prediction", [
    pytest.param("sd2_base_256", "eps", marks=pytest.mark.slow),  # the same run as sd2_v_512's but for eps
    ("sd2_v_512", "v"),
])
def test_sd2_recipe_trains_two_steps_on_cached_latents(name, prediction, files, cached_latents):
    out = files["root"] / name
    proc = run("train.py", f"experiment={name}", *stage2_overrides(files, cached_latents), f"hydra.run.dir={out}",
               env=ONE_THREAD)
    ckpt = checkpoint(out)
    hparams = ckpt["hyper_parameters"]
    assert ckpt["global_step"] == 2 and hparams["prediction_type"] == prediction
    assert hparams["unet"]["channel_mult"] == [1, 2, 4, 4] and hparams["unet"]["num_res_blocks"] == 2
    assert hparams["conditioner"]["pretrained"] == str(files["text"])
    assert not any(k.startswith("ema.") for k in ckpt["state_dict"])  # neither anchor keeps an EMA here
    assert list((out / "wandb").glob("offline-run-*"))
    log = (out / f"{name}.log").read_text()
    assert "FID/KID off: no Inception weights" in log and "CLIP score off: no CLIP weights" in log
    if name == "sd2_v_512":
        assert "the targets for clip_score, fid can never be met" in log
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sd2_v_512_under_fsdp_samples_and_evaluates_its_gathered_unet(files, cached_latents):
    """trainer=fsdp over 2 CPU processes: the U-Net is sharded and the recipe keeps no EMA, so the evaluation and
    the sample grid run on its gathered weights; the CLIP score equals evaluate.py's on the saved checkpoint in
    one process (in fp32, so that the two CLIP scores can be compared closely; bf16-mixed under FSDP runs in
    tests/test_matrix.py)."""
    out = files["root"] / "fsdp"
    clip = ["evaluation.clip.arch=ViT-S-32-alt", "evaluation.clip.random_seed=0", "evaluation.steps=2"]
    overrides = [o for o in stage2_overrides(files, cached_latents) if not o.startswith(("trainer.devices=",
                                                                                        "global_batch_size="))]
    run("train.py", "experiment=sd2_v_512", "trainer=fsdp", "trainer.devices=2", "trainer.precision=32",
        "global_batch_size=4", *overrides, *clip, "callbacks.evaluation.every_n_images=4", f"hydra.run.dir={out}",
        env=ONE_THREAD)
    log = (out / "sd2_v_512.log").read_text()
    scores = [float(x) for x in re.findall(r"evaluation at \d+ images \(step \d\): clip_score=([-\d.e]+)", log)]
    assert len(scores) == 2 and list((out / "images").glob("samples_*.png"))
    proc = run("evaluate.py", f"ckpt={out / 'checkpoints' / 'last.ckpt'}", *clip, "evaluation.cfg_scale=8.0",
               "evaluation.batch_size=32", f"out={out / 'evaluated'}", "device=cpu", env=ONE_THREAD)
    report = json.loads((out / "evaluated" / "evaluation.json").read_text())
    assert report["checkpoints"][0]["clip_score"] == pytest.approx(scores[-1], abs=1e-6), proc.stdout[-2000:]


@pytest.mark.slow
def test_sd_autoencoder_f8_trains_two_steps_with_lpips_and_the_discriminator(files):
    out = files["root"] / "stage1"
    run("train.py", "experiment=sd_autoencoder_f8", *R.CPU, *R.AUTOENCODER, f"data.train_shards={files['shards']}",
        f"data.val_shards={files['holdout']}", f"model.loss.lpips_vgg_path={files['vgg']}",
        f"model.loss.lpips_lin_path={files['lin']}", "trainer.max_steps=2", f"hydra.run.dir={out}", env=ONE_THREAD)
    ckpt = checkpoint(out)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["loss"]["perceptual_weight"] == 1.0
    assert any(k.startswith("loss.discriminator.") for k in ckpt["state_dict"])
    assert any(k.startswith("loss.lpips.lins.") for k in ckpt["state_dict"])  # LPIPS in the loss
    logged = next((out / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()  # the offline run's records
    assert b"train/d_loss" in logged and b"train/g_loss" in logged  # the discriminator's phase ran (step 1)
    assert logged.count(b"eval/heldout_psnr") >= 2  # the held-out curve: at the start and the end


@pytest.mark.slow
def test_sd_finetune_512_trains_two_steps_from_imported_weights(files):
    from tiny_sd import UNET, write_diffusers_folder

    source = write_diffusers_folder(files["root"] / "sd_diffusers")
    out = files["root"] / "finetune"
    run("train.py", "experiment=sd_finetune_512", *R.CPU, f"init_from={source}", f"data.train_shards={files['shards']}",
        "data.resolution=64", "model.sampling.steps=2", "callbacks.sample_images.steps=2", "trainer.max_steps=2",
        f"hydra.run.dir={out}", env=ONE_THREAD)
    ckpt = checkpoint(out)
    assert ckpt["global_step"] == 2
    assert {k: ckpt["hyper_parameters"]["unet"][k] for k in UNET} == UNET  # the imported architecture
    assert ckpt["hyper_parameters"]["unet"]["gradient_checkpointing"]  # the recipe's runtime choice
    unet = {k[5:]: v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}
    ema = {k[10:]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.model.")}
    assert unet.keys() == ema.keys() and any(not torch.equal(unet[k], ema[k]) for k in unet)
    assert list((out / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_throughput_script_runs_at_cpu_size(tmp_path):
    proc = run("bench/recipe_throughput.py", "--tiny", "--device", "cpu", "--steps", "3", "--warmup", "1",
               "--batch-per-device", "2", "--samples", "8", "--workdir", str(tmp_path), env=ONE_THREAD)
    results = dict(line[len("RESULT "):].split("=") for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    assert {"images_per_s_per_device", "seconds_per_step", "train_gflops_per_image"} <= set(results)
    measured = json.loads((tmp_path / "throughput.json").read_text())
    assert measured["steps"] == 2 and measured["images_per_step"] == 2  # steps 2 and 3 of batch 2 timed


def test_recipe_costs_prints_a_table_per_recipe(capsys):
    from bench.recipe_costs import main

    main()  # the script's main, in this process
    out = capsys.readouterr().out
    for name in RECIPES:
        assert f"### {name}" in out
    results = {k: float(v) for k, v in (line[len("RESULT "):].split("=") for line in out.splitlines()
                                        if line.startswith("RESULT "))}
    # 3 × forward; the forward is bench/flops.py's count, itself checked against torch's FLOP counter there
    assert results["sd2_v_512_train_gflops_per_image"] == pytest.approx(
        3 * results["sd2_v_512_forward_gflops_per_image"], rel=1e-5)
    # GPU-hours = images / (images/s per GPU) / 3600 at the anchors' numbers
    assert results["sd2_v_512_h100_hours"] == pytest.approx(2_560_000 / 136 / 3600, rel=1e-5)
    assert results["sd2_base_256_a100_hours"] == pytest.approx(550_000 * 2048 / (1100 / 8) / 3600, rel=1e-5)
    assert "torchrun --nnodes 8" in out and "hydra/launcher=slurm" in out
    # 8 GPUs at sd2_v_512's 512 images per step: 8 per GPU, 8 steps accumulated (MLPerf fits 8 per GPU)
    assert "global batch 512 = 8 × 8 × 8 accumulated" in out

