"""Cached latents and text embeddings (ldm.data.cache_latents, data=latents): the same loss as encoding on the fly."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import tiny_ldm as T
from ldm.data.cache_latents import cache_latents
from ldm.data.latents import LatentDataModule, LatentShardDataset, collate_latents
from ldm.data.shards import ShardDataset, collate_samples
from ldm.data.stats import NoUsableDataError
from ldm.data.writer import TarShardWriter

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "configs" / "model" / "conditioner" / "emoji_clip.yaml"
CAPTIONS = ["red apple", "snowman", "owl", "a very long caption " + "with many words " * 30, "key", "pig", "grapes",
            "droplet"]


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    with TarShardWriter(out, prefix="img", shard_size=5) as writer:
        for i, caption in enumerate(CAPTIONS):
            pixels = (torch.rand(12, 10, 3, generator=g) * 255).to(torch.uint8).numpy()
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            writer.write(f"{i:04d}", {"png": buffer.getvalue(), "txt": caption})
    return out


@pytest.fixture(scope="module")
def ae(tmp_path_factory) -> Path:
    return T.autoencoder_ckpt(tmp_path_factory.mktemp("ae"))


def read_all(dataset, collate) -> dict:
    return collate(list(dataset))


@pytest.fixture(scope="module")
def cache(image_shards, ae, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "latents"
    summary = cache_latents(str(image_shards), out, str(ae), resolution=T.SIZE, conditioner=str(TEXT), batch_size=3,
                            shard_size=4, num_workers=0)
    assert summary["samples"] == len(CAPTIONS) and json.loads((out / "cache.json").read_text())["shards"]
    return out


@pytest.fixture(scope="module")
def text_module(ae):
    conditioner = OmegaConf.to_container(OmegaConf.load(TEXT))
    return T.module(ae, unet={**T.UNET, "context_dim": 256}, conditioner=conditioner, noise_seeding="per_sample",
                    ucg_rate=0.5, offset_noise=0.1).train()


def test_cached_latents_give_the_same_loss_as_encoding(image_shards, cache, text_module, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    images = read_all(ShardDataset(str(image_shards), resolution=T.SIZE, shuffle=False), collate_samples)
    latents = read_all(LatentShardDataset(str(cache), shuffle=False), collate_latents)
    assert latents["key"] == images["key"] and latents["caption"] == images["caption"]
    assert "image" not in latents and latents["latent"].shape == (len(CAPTIONS), 4, T.SIZE, T.SIZE)
    # the long caption takes two 77-token chunks; the others are padded (masked) to match
    assert latents["context"].shape == (len(CAPTIONS), 154, 256)
    assert latents["mask"][3, 77:].any() and not latents["mask"][0, 77:].any()

    uncond_calls = []
    empty_context = text_module.empty_context
    monkeypatch.setattr(text_module, "empty_context", lambda n: uncond_calls.append(n) or empty_context(n))
    loss_images, _ = text_module.training_loss(images)
    loss_cached, _ = text_module.training_loss(latents)  # cached latents and text embeddings
    torch.testing.assert_close(loss_cached, loss_images, rtol=1e-5, atol=1e-7)
    assert uncond_calls  # captions dropped by ucg_rate took the context of "" in the cached path
    del latents["context"], latents["mask"]
    loss_latents, _ = text_module.training_loss(latents)  # cached latents, captions encoded per step
    torch.testing.assert_close(loss_latents, loss_images, rtol=1e-5, atol=1e-7)


def test_data_latents_config_trains(cache, text_module, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["data=latents", f"data.train_shards={cache}", f"data.resolution={T.SIZE}",
                                          "data.batch_size=4", "data.num_workers=0", "data.epoch_length=8",
                                          "autoencoder.ckpt_path=x"])
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, LatentDataModule)
    encoded = []
    text_module.autoencoder.encoder.register_forward_hook(lambda *args: encoded.append(1))
    trainer = T.trainer(tmp_path, max_steps=2)
    trainer.fit(text_module, datamodule)
    assert trainer.global_step == 2 and not encoded  # batches of latents: the autoencoder never ran


def test_image_shards_read_as_cached_latents_stop_with_one_clear_error(image_shards):
    # Cached latents go through the same stages as images with their own decoder: a shard set without one
    # latent ends a plain pass and a resampled stream (which never ends by itself) with the same error.
    for options in ({}, {"resampled": True, "epoch_length": 100}):
        dataset = LatentShardDataset(str(image_shards), **options)
        with pytest.raises(NoUsableDataError, match="no usable samples"):
            list(dataset)
        assert dataset.stats.skipped["no_latent"] >= len(CAPTIONS) and dataset.stats.yielded == 0
