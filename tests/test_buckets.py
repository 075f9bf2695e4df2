"""Aspect-ratio bucketing (ldm.data.buckets) and resuming a shard stream mid-epoch (ShardLoader.resume_from)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data import ShardDataModule, ShardDataset, ShardLoader, TarShardWriter
from ldm.data.buckets import AspectRatioBuckets, BucketTransform, buckets_from_max_area

# (width, height) of the source images: wide, tall and square ones
SHAPES = [(60, 30), (30, 60), (40, 40), (64, 36), (36, 64), (50, 48), (90, 40), (41, 80)] * 3


def png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    with TarShardWriter(out, prefix="shapes", shard_size=6) as writer:
        for i, (w, h) in enumerate(SHAPES):
            writer.write(f"{i:04d}", {"png": png(w, h, i), "txt": f"image {i}"})
    return out


def test_max_area_rule_by_hand():
    # width 192: 65536 // 192 = 341 → 320; 256 → 256; 320: 204 → 192; 128: 512 (4:1, beyond max_ratio 2);
    # sorted by h/w
    assert buckets_from_max_area(65536, step=64, max_ratio=2.0) == [(192, 320), (256, 256), (320, 192)]
    assert AspectRatioBuckets.from_config({"max_area": 65536}).sizes == [(192, 320), (256, 256), (320, 192)]
    with pytest.raises(ValueError, match="max_area"):
        AspectRatioBuckets.from_config({"area": 10})
    with pytest.raises(ValueError, match="multiples of 64"):
        AspectRatioBuckets([[100, 64]], step=64)


def test_each_image_goes_to_the_nearest_aspect_ratio():
    buckets = AspectRatioBuckets([[16, 16], [16, 32], [32, 16]])
    assert buckets.assign(width=300, height=140) == (16, 32)  # wide
    assert buckets.assign(width=140, height=300) == (32, 16)  # tall
    assert buckets.assign(width=100, height=90) == (16, 16)
    assert buckets.assign(width=2000, height=100) == (16, 32)  # beyond the widest: the widest


def test_resize_to_cover_then_crop_never_squashes():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 300, 3), dtype=np.uint8))
    out = BucketTransform(AspectRatioBuckets([[192, 320], [256, 256]]))(image)
    assert out.shape == (3, 192, 320)
    # by hand: scale max(192/150, 320/300) = 1.28 → 384×192, center crop 320 wide → x from 32
    reference = image.resize((384, 192), Image.Resampling.BICUBIC).crop((32, 0, 352, 192))
    expected = torch.from_numpy(np.asarray(reference).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(out, expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_batch_holds_one_bucket(shards, workers):
    buckets = AspectRatioBuckets([[16, 16], [16, 32], [32, 16]])
    dataset = ShardDataset(str(shards), shuffle=False, buckets=buckets)
    batches = list(ShardLoader(dataset, batch_size=4, num_workers=workers))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == [f"{i:04d}" for i in range(len(SHAPES))]  # every image once, none dropped
    for b in batches:
        assert b["image"].ndim == 4 and b["image"].shape[0] == len(b["key"]) <= 4
        for key in b["key"]:
            w, h = SHAPES[int(key)]
            assert tuple(b["image"].shape[-2:]) == buckets.assign(w, h)


def test_a_bucketed_dataset_read_directly_gives_samples_cropped_to_their_bucket(shards):
    # The loader makes the one-bucket batches (in each worker); the dataset itself yields single samples.
    buckets = AspectRatioBuckets([[16, 16], [16, 32], [32, 16]])
    samples = list(ShardDataset(str(shards), shuffle=False, buckets=buckets))
    assert sorted(s["key"] for s in samples) == [f"{i:04d}" for i in range(len(SHAPES))]
    for sample in samples:
        w, h = SHAPES[int(sample["key"])]
        assert tuple(sample["image"].shape) == (3, *buckets.assign(w, h))


def test_datamodule_takes_buckets_from_config(shards):
    dm = ShardDataModule(str(shards), batch_size=3, num_workers=0, resampled=True, epoch_length=12,
                         buckets={"max_area": 512, "step": 16, "max_ratio": 2.0})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch["image"].shape[-2:]) in dm.buckets.sizes


# -- resuming mid-epoch -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_plain_pass_resumes_after_the_batches_already_trained(shards, workers):
    dataset = ShardDataset(str(shards), resolution=16, shuffle_buffer=5)
    full = [b["key"] for b in ShardLoader(ShardDataset(str(shards), resolution=16, shuffle_buffer=5),
                                          batch_size=3, num_workers=workers)]
    loader = ShardLoader(dataset, batch_size=3, num_workers=workers)
    loader.resume_from(epoch=0, batches=3, step=3)
    resumed = [b["key"] for b in loader]
    # the same order (epoch 0's shuffle), without what the first three batches held
    assert sorted(k for b in resumed for k in b) == sorted(k for b in full[3:] for k in b)
    if workers == 0:
        assert resumed == full[3:]
    assert [k for b in loader for k in b] != []  # the next epoch is whole again
    assert sum(len(b) for b in ShardLoader(dataset, batch_size=3)) == len(SHAPES)


def test_resampled_stream_does_not_replay_the_epoch_start(shards):
    def keys(resume: bool) -> list[str]:
        loader = ShardLoader(ShardDataset(str(shards), resolution=16, resampled=True, epoch_length=12,
                                          shuffle_buffer=4), batch_size=3)
        if resume:
            loader.resume_from(epoch=0, batches=2, step=2)
        return [k for b in loader for k in b["key"]]

    fresh, resumed = keys(False), keys(True)
    assert len(fresh) == 12 and len(resumed) == 6  # the rest of the epoch: 12 − 2·3 samples
    assert resumed != fresh[:6]  # a new draw (the resume step joins the seed), not the epoch's start again
    assert keys(True) == resumed  # and reproducible
