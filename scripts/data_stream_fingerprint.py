"""A fingerprint of what the shard reader yields: run it on two versions of ldm.data to show they read alike.

    OMP_NUM_THREADS=1 python scripts/data_stream_fingerprint.py              # RESULT lines, one per case
    OMP_NUM_THREADS=1 python scripts/data_stream_fingerprint.py --dump a.json  # and every case in full

Each case reads small generated shards (good, corrupt, uncaptioned, truncated, cached-latent, odd-shaped) the
way training does: shuffled, resampled, split by rank and worker, resumed mid-epoch, bucketed, over two epochs,
and records the keys in order, a hash of every tensor, the DataStats counts and any error (type and message,
temporary paths replaced). Equal fingerprints on two versions mean equal streams, seeds, counts and messages.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.data import DataStats, ShardDataModule, ShardDataset, ShardLoader, TarShardWriter  # noqa: E402
from ldm.data.latents import LatentDataModule, LatentShardDataset, npy_bytes  # noqa: E402


def png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(root: Path) -> dict[str, list[str]]:
    """The shard sets the cases read; every byte is fixed by the seeds, so two runs read the same files."""
    rng = np.random.default_rng(0)
    sets: dict[str, list[str]] = {}
    with TarShardWriter(root / "clean", prefix="clean", shard_size=7) as writer:
        for i in range(30):
            writer.write(f"c{i:03d}", {"png": png(20 + i % 5, 18 + i % 3, i), "txt": f"picture {i}"})
    sets["clean"] = writer.shards
    with TarShardWriter(root / "messy", prefix="messy", shard_size=9) as writer:
        for i in range(28):
            kind = i % 7
            if kind == 1:
                writer.write(f"m{i:03d}", {"jpg": rng.bytes(300), "txt": "noise"})
            elif kind == 3:
                writer.write(f"m{i:03d}", {"png": png(16, 16, i)})
            elif kind == 4:
                writer.write(f"m{i:03d}", {"txt": "no picture", "json": {"i": i}})
            elif kind == 5:
                writer.write(f"m{i:03d}", {"png": png(16, 16, i), "txt": "   "})
            elif kind == 6:  # undecodable and uncaptioned: with missing_caption="empty" it counts as both
                writer.write(f"m{i:03d}", {"jpg": rng.bytes(300)})
            else:
                writer.write(f"m{i:03d}", {"png": png(16, 16, i), "txt": f"good {i}"})
    sets["messy"] = writer.shards
    with TarShardWriter(root / "bad", prefix="bad", shard_size=4) as writer:
        for i in range(8):
            writer.write(f"b{i:03d}", {"jpg": rng.bytes(200), "txt": "noise"})
    sets["bad"] = writer.shards
    with TarShardWriter(root / "rare", prefix="rare", shard_size=10) as writer:
        for i in range(19):
            writer.write(f"r{i:03d}", {"jpg": rng.bytes(200), "txt": "noise"})
        writer.write("good", {"png": png(16, 16, 0), "txt": "the one good sample"})
    sets["rare"] = writer.shards
    shapes = [(60, 30), (30, 60), (40, 40), (64, 36), (36, 64), (50, 48)] * 3
    with TarShardWriter(root / "shapes", prefix="shapes", shard_size=5) as writer:
        for i, (w, h) in enumerate(shapes):
            writer.write(f"s{i:03d}", {"png": png(w, h, i), "txt": f"shape {i}"})
    sets["shapes"] = writer.shards
    # A shard cut inside a member near its end: the tar reader fails on it, after giving what came before.
    source = sets["clean"][0]
    with tarfile.open(source) as tar:
        at = tar.getmembers()[-4]
    cut = root / "cut" / "cut-000000.tar"
    cut.parent.mkdir()
    cut.write_bytes(Path(source).read_bytes()[: at.offset_data + at.size // 2])
    sets["cut"] = [str(cut)]
    junk = root / "junk" / "junk-000000.tar"
    junk.parent.mkdir()
    junk.write_bytes(rng.bytes(2048))
    sets["junk"] = [str(junk)]
    # Cached latents as cache_latents writes them: with text contexts (some of empty captions) or without.
    for name, with_context in (("latents", False), ("latents_ctx", True)):
        with TarShardWriter(root / name, prefix=name, shard_size=6) as writer:
            for i in range(20):
                files: dict[str, Any] = {
                    "latent.npy": npy_bytes(rng.standard_normal((4, 3, 3)).astype(np.float32)),
                    "std.npy": npy_bytes(np.abs(rng.standard_normal((4, 3, 3))).astype(np.float32)),
                    "txt": f"latent {i}"}
                if i % 5 == 1:
                    files["latent.npy"] = b"\x93NUMPY broken"
                if i % 5 == 2:
                    del files["latent.npy"]
                if i % 5 == 3:
                    files["txt"] = ""
                if with_context:
                    length = 2 + i % 3
                    files["context.npy"] = npy_bytes(rng.standard_normal((length, 8)).astype(np.float32))
                    files["mask.npy"] = npy_bytes(np.ones(length, dtype=bool))
                writer.write(f"l{i:03d}", files)
        sets[name] = writer.shards
    return sets


def describe(value: Any) -> Any:
    """Keys and strings as they are, tensors as shape, dtype and a hash of their bytes."""
    if isinstance(value, torch.Tensor):
        data = value.detach().contiguous().cpu()
        return [list(data.shape), str(data.dtype), hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]]
    if isinstance(value, dict):
        return {k: describe(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    return value


def record(read: Callable[[], Iterable[Any]], stats: Callable[[], Any] | None, root: Path) -> dict[str, Any]:
    torch.manual_seed(0)  # random crops and flips draw from torch's generator
    items: list[Any] = []
    error = None
    try:
        for item in read():
            items.append(describe(item))
    except Exception as exn:  # noqa: BLE001 - the error is part of what is compared
        # A worker's error carries its traceback (line numbers): keep its first and last line only.
        lines = str(exn).strip().splitlines() or [""]
        message = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        error = f"{type(exn).__name__}: {message}".replace(str(root), "<tmp>")
    out: dict[str, Any] = {"items": items, "error": error}
    if stats is not None:
        out["stats"] = stats().as_dict() if isinstance(stats(), DataStats) else stats()
    return out


def loader_epochs(loader: ShardLoader, epochs: int = 2) -> Callable[[], Iterable[Any]]:
    def read() -> Iterable[Any]:
        for epoch in range(epochs):
            yield f"epoch {epoch}"
            yield from loader
    return read


def dataset_epochs(dataset: ShardDataset, epochs: int = 2) -> Callable[[], Iterable[Any]]:
    def read() -> Iterable[Any]:
        for epoch in range(epochs):
            yield f"epoch {epoch}"
            yield from dataset
    return read


def cases(sets: dict[str, list[str]], root: Path) -> dict[str, Callable[[], dict[str, Any]]]:
    out: dict[str, Callable[[], dict[str, Any]]] = {}

    def dataset_case(name: str, shards: list[str], epochs: int = 2, **options: Any) -> None:
        def run() -> dict[str, Any]:
            dataset = ShardDataset(shards, resolution=16, **options)
            return record(dataset_epochs(dataset, epochs), lambda: dataset.stats, root)
        out[name] = run

    def loader_case(name: str, shards: list[str], batch_size: int, workers: int, resume: tuple | None = None,
                    dataset_class: type = ShardDataset, epochs: int = 2, loader_options: dict | None = None,
                    **options: Any) -> None:
        def run() -> dict[str, Any]:
            if dataset_class is ShardDataset:
                options.setdefault("resolution", 16)
            dataset = dataset_class(shards, **options)
            loader = ShardLoader(dataset, batch_size=batch_size, num_workers=workers, **(loader_options or {}))
            if resume is not None:
                loader.resume_from(*resume)
            result = record(loader_epochs(loader, epochs), lambda: dataset.stats, root)
            try:
                result["len"] = len(loader)
            except TypeError as exn:
                result["len"] = str(exn)
            return result
        out[name] = run

    dataset_case("plain_shuffled", sets["clean"], shuffle_buffer=5, seed=3)
    dataset_case("plain_in_order", sets["clean"], shuffle=False)
    dataset_case("plain_capped", sets["clean"], shuffle_buffer=4, epoch_length=11)
    dataset_case("plain_crop_flip", sets["clean"], random_crop=True, flip_prob=0.5, shuffle_buffer=3)
    dataset_case("resampled", sets["clean"], resampled=True, epoch_length=23, shuffle_buffer=6, seed=1)
    dataset_case("resampled_seed2", sets["clean"], resampled=True, epoch_length=23, shuffle_buffer=6, seed=2)
    dataset_case("messy_skip", sets["messy"], shuffle_buffer=4)
    dataset_case("messy_empty", sets["messy"], shuffle_buffer=4, missing_caption="empty")
    dataset_case("messy_resampled", sets["messy"], resampled=True, epoch_length=30, shuffle_buffer=8)
    dataset_case("bad_plain", sets["bad"], epochs=1)
    dataset_case("bad_resampled", sets["bad"], epochs=1, resampled=True, epoch_length=50)
    dataset_case("rare_resampled", sets["rare"], resampled=True, epoch_length=3, shuffle_buffer=1)
    dataset_case("cut_plain", sets["cut"])
    dataset_case("cut_resampled", sets["cut"], resampled=True, epoch_length=30, shuffle_buffer=7)
    dataset_case("junk_plain", sets["junk"], epochs=1)
    for workers in (0, 2):
        loader_case(f"loader_plain_w{workers}", sets["clean"], 4, workers, shuffle_buffer=5)
        loader_case(f"loader_resampled_w{workers}", sets["clean"], 4, workers, resampled=True, epoch_length=21,
                    shuffle_buffer=5)
        loader_case(f"loader_plain_resumed_w{workers}", sets["clean"], 3, workers, resume=(0, 3, 3), shuffle_buffer=5)
        loader_case(f"loader_plain_resumed_epoch1_w{workers}", sets["clean"], 3, workers, resume=(1, 2, 12),
                    shuffle_buffer=5)
        loader_case(f"loader_resampled_resumed_w{workers}", sets["clean"], 3, workers, resume=(0, 2, 2),
                    resampled=True, epoch_length=20, shuffle_buffer=5)
        loader_case(f"loader_buckets_w{workers}", sets["shapes"], 3, workers, shuffle_buffer=4,
                    buckets=_buckets())
        loader_case(f"loader_buckets_resampled_w{workers}", sets["shapes"], 3, workers, shuffle_buffer=4,
                    resampled=True, epoch_length=14, buckets=_buckets())
        loader_case(f"loader_messy_w{workers}", sets["messy"], 2, workers, shuffle_buffer=3,
                    loader_options={"persistent_workers": False, "drop_last": True})
        loader_case(f"loader_bad_w{workers}", sets["bad"], 2, workers, epochs=1,
                    loader_options={"persistent_workers": False})
        loader_case(f"latents_w{workers}", sets["latents"], 4, workers, dataset_class=LatentShardDataset,
                    shuffle_buffer=3)
        loader_case(f"latents_resampled_w{workers}", sets["latents"], 4, workers, dataset_class=LatentShardDataset,
                    resampled=True, epoch_length=16, shuffle_buffer=3, missing_caption="empty")
        loader_case(f"latents_context_w{workers}", sets["latents_ctx"], 4, workers, dataset_class=LatentShardDataset,
                    resampled=True, epoch_length=12, shuffle_buffer=3)
    dataset_case("split_rank1_of_2", sets["clean"], shuffle_buffer=5, seed=4)
    out["split_rank1_of_2"] = _with_env({"RANK": "1", "WORLD_SIZE": "2"}, out["split_rank1_of_2"])
    dataset_case("split_rank0_of_3_resampled", sets["clean"], resampled=True, epoch_length=9, seed=4)
    out["split_rank0_of_3_resampled"] = _with_env({"RANK": "0", "WORLD_SIZE": "3"},
                                                  out["split_rank0_of_3_resampled"])

    def latent_bad() -> dict[str, Any]:
        dataset = LatentShardDataset(sets["clean"], resampled=True, epoch_length=5)
        return record(lambda: dataset, lambda: dataset.stats, root)
    out["latents_of_image_shards"] = latent_bad

    def datamodules() -> dict[str, Any]:
        result = {}
        for cls, shards in ((ShardDataModule, sets["messy"]), (LatentDataModule, sets["latents"])):
            module = cls(shards, val_shards=shards, resolution=16, batch_size=4, num_workers=0, shuffle_buffer=3,
                         resampled=True, epoch_length=8)
            module.setup("fit")
            train = record(loader_epochs(module.train_dataloader(), 1), None, root)
            val = record(loader_epochs(module.val_dataloader(), 1), None, root)
            result[cls.__name__] = {"train": train, "val": val, "stats": module.data_stats()}
        return result
    out["datamodules"] = datamodules
    return out


def _buckets() -> Any:
    from ldm.data.buckets import AspectRatioBuckets

    return AspectRatioBuckets([[16, 16], [16, 32], [32, 16]])


def _with_env(env: dict[str, str], run: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    def wrapped() -> dict[str, Any]:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return run()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", help="write every case's full record to this JSON file")
    parser.add_argument("--only", nargs="*", help="run only these cases")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sets = write_shards(root)
        records = {}
        for name, run in cases(sets, root).items():
            if args.only and name not in args.only:
                continue
            records[name] = run()
            digest = hashlib.sha256(json.dumps(records[name], sort_keys=True).encode()).hexdigest()[:16]
            print(f"RESULT {name}={digest}", flush=True)
    everything = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]
    print(f"RESULT all={everything}")
    if args.dump:
        Path(args.dump).write_text(json.dumps(records, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
