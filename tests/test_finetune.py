"""Fine-tuning: training from imported weights (init_from), sampling from them, DreamBooth with prior
preservation, LoRA adapters. Tiny random SD-shaped models (tests/tiny_sd.py) stand in for real ones."""

from __future__ import annotations

import importlib.util
import logging
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from cli import ROOT, TINY_DATA, run
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors import safe_open
from tiny_sd import UNET, write_diffusers_folder, write_single_file

from ldm.cli_errors import friendly_errors
from ldm.convert import save_single_file
from ldm.data.dreambooth import DreamBoothDataset, class_cache_key, collate, generate_class_images, list_images
from ldm.data.transforms import ImageTransform
from ldm.model import LatentDiffusion
from ldm.modules.lora import LoRASettings, add_lora, lora_parameters, lora_state_dict, save_lora
from ldm.modules.unet import UNetModel
from ldm.pipeline import LatentDiffusionPipeline
from ldm.training.dreambooth import DreamBoothModule

# Tiny models: one thread per process is several times faster than two when the two cores are shared.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PROMPT = "a sks emoji"
CLASS_PROMPT = "an emoji"
# The experiment's conditioner: the init source's text encoder replaces it.
EMOJI_CLIP = {"_target_": "ldm.conditioning.text.FrozenOpenCLIPTextEncoder", "arch": "ViT-S-32-alt"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_sd")
    return {"diffusers": write_diffusers_folder(root / "diffusers"),
            "single_file": write_single_file(root / "single" / "model.safetensors")}


def _instance_images(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = np.full((32, 32, 3), 255, np.uint8)
        image[8 + i : 24 + i, 8:24] = (200, 30, 30)
        Image.fromarray(image).save(folder / f"subject_{i}.png")
    return folder


def _script(name: str):
    """train.py / sample.py as modules, to run their main functions in this process: the code path of the CLI
    without a subprocess's seconds of imports (tests/test_train.py runs the CLIs themselves)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py") + "_script", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


load_init_weights = LatentDiffusion.read_source  # init_from's reading of imported weights


def _module(init, **kwargs) -> DreamBoothModule:
    return DreamBoothModule.from_settings(dict(unet=dict(UNET), conditioner=EMOJI_CLIP, schedule={}, **kwargs),
                                          source=init)


# ------------------------------------------------------------------------------------------- train.py runs


@pytest.fixture(scope="module")
def dreambooth_lora(tiny, tmp_path_factory) -> Path:
    """`train.py experiment=dreambooth` from a diffusers folder, with prior preservation and `lora=true`."""
    root = tmp_path_factory.mktemp("dreambooth")
    out = root / "run"
    run("train.py", "experiment=dreambooth", f"init_from={tiny['diffusers']}",
        f"instance_data={_instance_images(root / 'instance')}", f'instance_prompt="{PROMPT}"',
        f'class_prompt="{CLASS_PROMPT}"', "num_class_images=2", "lora=true", f"hydra.run.dir={out}",
        f"paths.data_dir={root / 'data'}", "data.resolution=32", "data.progress=false", "trainer.max_steps=2",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "model.sampling.steps=2",
        "callbacks.sample_images.steps=2", "callbacks.sample_images.n_per_prompt=1", env=ONE_THREAD)
    return out


def test_dreambooth_from_diffusers_folder_with_lora_and_class_images(dreambooth_lora):
    ckpt = torch.load(dreambooth_lora / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert ckpt["global_step"] == 2
    # The architecture, text encoder and scale factor come from the imported weights.
    assert {k: hparams["unet"][k] for k in UNET} == UNET
    assert hparams["scale_factor"] == 0.5 and hparams["prediction_type"] == "eps"
    assert Path(hparams["conditioner"]["pretrained"]).is_relative_to(dreambooth_lora / "pretrained")
    assert hparams["lora"]["enabled"] and hparams["lora"]["rank"] == 4
    assert hparams["optimizer"]["lr"] == 5e-6 and hparams["lr_schedule"] == {"kind": "constant", "warmup_steps": 0,
                                                                              "min_lr_ratio": 0.0}
    # The base model filled the (cached) class folder; both loss terms were logged.
    class_dirs = list((dreambooth_lora.parent / "data" / "class_images").iterdir())
    assert len(class_dirs) == 1 and len(list_images(class_dirs[0])) == 2
    metrics = (dreambooth_lora / "csv" / "metrics.csv").read_text()
    assert "train/instance_loss" in metrics and "train/prior_loss" in metrics
    assert list((dreambooth_lora / "images").glob("samples_*.png"))


def test_export_lora_writes_adapters_only(dreambooth_lora, tmp_path):
    from ldm.export_lora import export_lora

    out = tmp_path / "adapter.safetensors"
    info = export_lora(dreambooth_lora / "checkpoints" / "last.ckpt", out)
    with safe_open(str(out), framework="pt") as f:
        keys = list(f.keys())
    attention_layers = sum(1 for name, m in UNetModel(**UNET).named_modules() if name.endswith((".attn1", ".attn2")))
    assert len(keys) == attention_layers * 4 * 2  # (q, k, v, out) × (A, B)
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert info["adapter_bytes"] < 0.05 * info["unet_bytes"]


def test_sample_cli_from_diffusers_folder_with_lora(dreambooth_lora, tiny, tmp_path):
    from ldm.export_lora import export_lora

    adapter = tmp_path / "adapter.safetensors"
    export_lora(dreambooth_lora / "checkpoints" / "last.ckpt", adapter)
    out = tmp_path / "samples"
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={tiny['diffusers']}", f"lora={adapter}", "lora_scale=0.8",
                                           f'prompt="{PROMPT}"', "n=2", "steps=2", f"out={out}", "progress=false"])
    _script("sample.py").sample(cfg)
    images = [np.asarray(Image.open(p)) for p in sorted(out.glob("0*.png"))]
    # image_size: the diffusers U-Net's sample_size (16) times the autoencoder's downsampling (2).
    assert len(images) == 2 and images[0].shape == (32, 32, 3)


def test_init_from_single_file_trains(tiny, tmp_path):
    out = tmp_path / "run"
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=emoji_ldm", f"init_from={tiny['single_file']}", f"paths.root_dir={tmp_path}",
            f"paths.output_dir={out}", f"paths.data_dir={tmp_path / 'data'}", *TINY_DATA, "trainer.max_steps=2",
            "model.lr_schedule.warmup_steps=0", "callbacks.sample_images.steps=2",
            "callbacks.sample_images.prompts=[red apple]", "logger=csv"])
    _script("train.py").train(cfg)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert {k: ckpt["hyper_parameters"]["unet"][k] for k in UNET} == UNET
    assert ckpt["hyper_parameters"]["scale_factor"] == 0.5
    # The checkpoint alone samples (the text encoder comes from the run's pretrained/ folder).
    pipe = LatentDiffusionPipeline.from_checkpoint(out / "checkpoints" / "last.ckpt")
    assert pipe.generate(["red apple"], steps=2, cfg_scale=1.0).images.shape == (1, 3, 32, 32)


# ------------------------------------------------------------------------------------------- init_from


def test_init_from_loads_weights_and_restarts_the_ema(tiny, tmp_path):
    init = load_init_weights(tiny["single_file"], tmp_path)
    module = _module(init, ema={"decay": 0.9})
    for key, value in init.unet_state.items():
        torch.testing.assert_close(module.unet.state_dict()[key], value.float(), rtol=0, atol=0)
        torch.testing.assert_close(module.ema.model.state_dict()[key], value.float(), rtol=0, atol=0)
    assert module.conditioner.output_dim == UNET["context_dim"]
    assert module.autoencoder.scale_factor == 0.5 and module.prediction_type == "eps"


def _one_line_error(caplog, fn) -> str:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="ldm"), pytest.raises(SystemExit) as exit_info:
        friendly_errors(fn)()
    assert exit_info.value.code == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "ldm"]
    assert len(messages) == 1 and "\n" not in messages[0], messages
    return messages[0]


def test_autoencoder_ckpt_path_takes_stable_diffusion_weights(tiny, tmp_path):
    """A stage-2 run can take SD's autoencoder alone (MLPerf's SD benchmark: SD2's VAE, a new U-Net)."""
    import shutil

    from tiny_sd import VAE

    from ldm.convert import convert
    from ldm.model_parts import load_autoencoder

    sources = {"diffusers": tiny["diffusers"], "single_file": tiny["single_file"]}
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    for kind, path in sources.items():
        model, config, latent_std = load_autoencoder(str(path))
        expected = convert(path).autoencoder_state
        assert config["scale_factor"] == VAE["scale_factor"] and latent_std is None, kind
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, expected[key].float(), rtol=0, atol=0)
        assert model.encode(x).mean.shape == (1, 4, 8, 8)
    shutil.copytree(sources["diffusers"], tmp_path / "no_vae", ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(ValueError, match="no_vae holds no autoencoder"):
        load_autoencoder(str(tmp_path / "no_vae"))


def test_init_from_errors_are_one_line(tiny, tmp_path, caplog):
    from tiny_sd import VAE

    from ldm.modules.autoencoder import AutoencoderKL

    message = _one_line_error(caplog, lambda: load_init_weights(tmp_path / "nope.safetensors", tmp_path))
    assert "init_from not found" in message and "nope.safetensors" in message

    class RunsCode:
        def __reduce__(self):
            return (print, ("unpickled code ran",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "x": RunsCode()}, evil)
    assert "refused to unpickle" in _one_line_error(caplog, lambda: load_init_weights(evil, tmp_path))

    unet_only = tmp_path / "unet_only.safetensors"
    save_single_file(unet_only, unet=UNetModel(**UNET))
    assert "holds no autoencoder" in _one_line_error(caplog, lambda: _module(load_init_weights(unet_only, tmp_path)))

    no_text = tmp_path / "no_text.safetensors"  # the experiment's 256-wide text encoder with a 64-wide U-Net
    save_single_file(no_text, unet=UNetModel(**UNET), autoencoder=AutoencoderKL(**VAE))
    message = _one_line_error(caplog, lambda: _module(load_init_weights(no_text, tmp_path)))
    assert "context_dim is 64" in message and "256-wide" in message

    message = _one_line_error(caplog, lambda: DreamBoothModule.from_settings(
        dict(unet=dict(UNET), conditioner=EMOJI_CLIP, schedule={})))
    assert "set init_from=PATH" in message


# ------------------------------------------------------------------------------------------- DreamBooth


def test_dreambooth_batch_is_instance_first_and_loss_is_by_hand(tiny, tmp_path):
    instance = sorted(_instance_images(tmp_path / "instance", 2).iterdir())
    classes = sorted(_instance_images(tmp_path / "class", 3).iterdir())
    dataset = DreamBoothDataset(instance, PROMPT, classes, CLASS_PROMPT, ImageTransform(32))
    assert len(dataset) == 3
    batch = collate([dataset[0], dataset[1]])
    assert batch["caption"] == [PROMPT, PROMPT, CLASS_PROMPT, CLASS_PROMPT] and batch["num_instance"] == 2
    assert batch["key"][:2] == ["instance/subject_0", "instance/subject_1"] and batch["key"][2].startswith("class/")
    assert torch.equal(batch["image"][0], dataset.transform(Image.open(instance[0])))

    weight = 0.7
    module = _module(load_init_weights(tiny["single_file"], tmp_path), prior_loss_weight=weight, ucg_rate=0.0,
                     sample_posterior=False, ema=None)
    torch.manual_seed(3)
    loss, _ = module.training_loss(batch)

    # By hand, with the same draws: t, then the noise (the only random numbers of this step).
    torch.manual_seed(3)
    with torch.no_grad():
        z0 = module.autoencoder.encode(batch["image"]).mode() * module.autoencoder.scale_factor
        context, mask = module.conditioner(batch["caption"])
    t = module.schedule.sample_timesteps(4)
    noise = torch.randn_like(z0)
    x_t = module.schedule.add_noise(z0, noise, t)
    mse = (module.unet(x_t, t, context, mask) - noise).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, mse[:2].mean() + weight * mse[2:].mean(), rtol=1e-6, atol=0)
    assert loss.dtype == torch.float32


def test_class_images_fill_the_folder_once(tiny, tmp_path):
    pipe = LatentDiffusionPipeline.from_checkpoint(tiny["single_file"])
    folder = tmp_path / "class"
    options = dict(steps=2, cfg_scale=1.0, progress=False)
    assert generate_class_images(pipe, folder, CLASS_PROMPT, 3, 32, batch_size=2, **options) == 3
    assert len(list_images(folder)) == 3 and Image.open(list_images(folder)[0]).size == (32, 32)
    assert generate_class_images(pipe, folder, CLASS_PROMPT, 3, 32, batch_size=2, **options) == 0  # cached
    first = list_images(folder)[0]
    first.unlink()
    assert generate_class_images(pipe, folder, CLASS_PROMPT, 3, 32, batch_size=2, **options) == 1
    assert len(list_images(folder)) == 3
    # The cache folder name depends on the model and on the prompt.
    keys = {class_cache_key(str(tiny[m]), p, 32, {}) for m in tiny for p in (CLASS_PROMPT, "a dog")}
    assert len(keys) == 4


# ------------------------------------------------------------------------------------------- LoRA


def test_lora_optimizer_holds_only_the_adapters(tiny, tmp_path):
    init = load_init_weights(tiny["single_file"], tmp_path)
    for text_encoder in (False, True):
        module = _module(init, lora={"enabled": True, "rank": 2, "text_encoder": text_encoder}, ema={"decay": 0.9})
        module.trainer = types.SimpleNamespace(estimated_stepping_batches=10)
        optimizer = module.configure_optimizers()["optimizer"]
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        adapters = lora_parameters(module.unet) + (lora_parameters(module.conditioner.text) if text_encoder else [])
        assert in_optimizer == {id(p) for p in adapters} and adapters
        assert not any(p.requires_grad for n, p in module.unet.named_parameters() if ".lora_" not in n)
        assert bool(lora_parameters(module.conditioner.text)) == text_encoder


def _random_adapter(pipe: LatentDiffusionPipeline, path: Path) -> None:
    """An adapter file with non-zero A and B for the U-Net and the text encoder of ``pipe``'s models."""
    import copy

    settings = LoRASettings(enabled=True, rank=2, alpha=3.0, text_encoder=True)
    unet, text = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.conditioner.text)
    add_lora(unet, 2, 3.0, 0.0, settings.target_modules)
    add_lora(text, 2, 3.0, 0.0, settings.text_encoder_target_modules)
    with torch.no_grad():
        for p in lora_parameters(unet) + lora_parameters(text):
            p.normal_(0, 0.2)
    save_lora(path, {"unet": lora_state_dict(unet), "text_encoder": lora_state_dict(text)}, settings)


def test_lora_merged_equals_unmerged_and_scale_zero_is_the_base_model(tiny, tmp_path):
    load = lambda: LatentDiffusionPipeline.from_checkpoint(tiny["single_file"])  # noqa: E731
    base = load()
    adapter = tmp_path / "adapter.safetensors"
    _random_adapter(base, adapter)
    options = dict(steps=3, cfg_scale=3.0, seed=0, image_size=32)
    base_images = base.generate([PROMPT], n=2, **options).images

    off = load().apply_lora(adapter, scale=0.0)
    torch.testing.assert_close(off.generate([PROMPT], n=2, **options).images, base_images, rtol=0, atol=1e-6)

    unmerged, merged = load().apply_lora(adapter, scale=0.8), load().apply_lora(adapter, scale=0.8, merge=True)
    assert not any(".lora_" in k for k in merged.unet.state_dict())
    assert merged.unet.state_dict().keys() == base.unet.state_dict().keys()
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        context, mask = unmerged.conditioner([PROMPT, CLASS_PROMPT])
        torch.testing.assert_close(merged.conditioner([PROMPT, CLASS_PROMPT])[0], context, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged.unet(x, t, context, mask), unmerged.unet(x, t, context, mask),
                                   rtol=0, atol=1e-5)
        assert (unmerged.unet(x, t, context, mask) - base.unet(x, t, context, mask)).abs().max() > 1e-3
    images = unmerged.generate([PROMPT], n=2, **options).images
    torch.testing.assert_close(merged.generate([PROMPT], n=2, **options).images, images, rtol=0, atol=1e-5)
    assert (images - base_images).abs().max() > 1e-3
