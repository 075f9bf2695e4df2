"""Reference statistics for FID and KID: Inception features of a set of real images, summarised.

    python -m ldm.evaluation.reference_stats SHARDS_OR_FOLDER OUT.npz --resolution 256 \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth

SHARDS_OR_FOLDER: webdataset shards (a brace pattern, a glob, a folder of .tar files) or a folder of images
(searched recursively). Images are prepared as training prepares them (shorter side resized to the resolution,
centre crop) and then enter the Inception network as uint8.

The .npz holds what FID and KID need and records what made it:

    mu (d,) float64, sigma (d, d) float64     FID's Gaussian (sigma only when there are more images than
                                              features; else ``features`` holds them all and both follow)
    features (n, d) float32                   every image's features, when n ≤ --max-stored-features
    kid_features (m, d) float32               a seeded random subset for KID, when ``features`` is absent
    extractor (JSON)                          network, weights (SHA-256 of the file, or "random weights, seed
                                              N") and preprocessing
    image_size, num_images, source

A set of 128 images at 2048 features takes 1 MB; 30,000 images take sigma's 32 MB plus the KID subset.
Comparing features with statistics made by another extractor, or at another image size, is an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldm.data.shards import ShardDataset
from ldm.data.transforms import ImageTransform, to_rgb
from ldm.evaluation.inception import InceptionFeatures

log = logging.getLogger(__name__)

FORMAT = "ldm-reference-stats-1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ReferenceStatsError(ValueError):
    """Statistics that cannot serve this evaluation (unreadable, or made by another extractor or image size)."""


@dataclass
class ReferenceStats:
    mu: np.ndarray  # (d,) float64
    sigma: np.ndarray  # (d, d) float64
    kid_features: np.ndarray  # (m, d) float32
    extractor: dict
    image_size: int
    num_images: int
    source: str = ""
    features: np.ndarray | None = None  # (n, d) float32: every image, when kept

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray, extractor: dict, image_size: int, source: str = "",
                      max_stored_features: int = 2048, kid_features: int = 1000, seed: int = 0) -> "ReferenceStats":
        f = np.asarray(features, dtype=np.float32)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ReferenceStatsError(f"reference statistics need at least 2 images, got {f.shape[0]}")
        f64 = f.astype(np.float64)
        mu, sigma = f64.mean(0), np.cov(f64, rowvar=False)
        keep = f.shape[0] <= max_stored_features
        if keep:
            subset = f
        else:
            rng = np.random.default_rng(seed)
            subset = f[np.sort(rng.choice(f.shape[0], size=min(kid_features, f.shape[0]), replace=False))]
        return cls(mu=mu, sigma=sigma, kid_features=subset, extractor=dict(extractor), image_size=int(image_size),
                   num_images=int(f.shape[0]), source=source, features=f if keep else None)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"format": np.array(FORMAT), "extractor": np.array(json.dumps(self.extractor, sort_keys=True)),
                  "image_size": np.array(self.image_size), "num_images": np.array(self.num_images),
                  "source": np.array(self.source)}
        if self.features is not None:
            arrays["features"] = self.features  # mu, sigma and the KID features all follow from them
        else:
            arrays.update(mu=self.mu, sigma=self.sigma, kid_features=self.kid_features)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceStats":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics not found: {path}")
        try:
            data = np.load(path, allow_pickle=False)
            if str(data["format"]) != FORMAT:
                raise KeyError("format")
            meta = dict(extractor=json.loads(str(data["extractor"])), image_size=int(data["image_size"]),
                        source=str(data["source"]))
            if "features" in data:
                stats = cls.from_features(data["features"], max_stored_features=len(data["features"]), **meta)
            else:
                stats = cls(mu=data["mu"], sigma=data["sigma"], kid_features=data["kid_features"],
                            num_images=int(data["num_images"]), **meta)
        except (KeyError, ValueError, OSError) as e:
            raise ReferenceStatsError(f"{path} is not a reference statistics file of this format ({FORMAT}): "
                                      f"make it with python -m ldm.evaluation.reference_stats ({e})") from None
        return stats

    def check(self, extractor: dict, image_size: int | None, path: str | Path = "") -> None:
        """One-line error when features of ``extractor`` at ``image_size`` px cannot be compared with these."""
        where = f"{path} " if path else ""
        if extractor != self.extractor:
            ours, theirs = _describe(extractor), _describe(self.extractor)
            raise ReferenceStatsError(
                f"reference statistics {where}were made by another feature extractor ({theirs}) than this "
                f"evaluation's ({ours}): remake them with python -m ldm.evaluation.reference_stats and the same "
                "weights")
        if image_size is not None and image_size != self.image_size:
            raise ReferenceStatsError(
                f"reference statistics {where}were made from {self.image_size} px images, the evaluated images are "
                f"{image_size} px: remake them with --resolution {image_size}")


def _describe(extractor: dict) -> str:
    return ", ".join(str(extractor.get(k)) for k in ("network", "weights", "preprocessing"))


# -- reading images -----------------------------------------------------------------------------------------------


def iter_images(source: str, resolution: int, max_images: int | None = None, batch_size: int = 32):
    """Batches (B, 3, R, R) in [-1, 1] from shards or an image folder, in a fixed order, every rank reading all."""
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
    if path.is_dir() and files and not list(path.glob("*.tar")):
        from PIL import Image

        transform = ImageTransform(resolution)

        def samples():
            for file in files:
                with Image.open(file) as image:
                    yield transform(to_rgb(image))
    else:
        dataset = ShardDataset(source, resolution=resolution, shuffle=False, resampled=False, split_nodes=False,
                               missing_caption="empty")

        def samples():
            for sample in dataset:
                yield sample["image"]

    batch, count = [], 0
    for image in samples():
        if max_images is not None and count >= max_images:
            break
        batch.append(image)
        count += 1
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def compute_reference_stats(source: str, extractor, resolution: int, max_images: int | None = None,
                            batch_size: int = 32, label: str | None = None, **kwargs) -> ReferenceStats:
    features = [extractor(batch) for batch in iter_images(source, resolution, max_images, batch_size)]
    if not features:
        raise ReferenceStatsError(f"no images found in {source}")
    return ReferenceStats.from_features(torch.cat(features), extractor.identity, resolution,
                                        source=label or str(source), **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="webdataset shards (pattern, glob or folder of .tar) or a folder of images")
    parser.add_argument("out", type=Path, help="the .npz to write")
    parser.add_argument("--resolution", type=int, required=True, help="image side in px, as the model generates")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--inception-weights", help="local Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    weights.add_argument("--random-seed", type=int, help="seeded random Inception weights (tests: numbers only "
                                                         "compare with others made the same way)")
    parser.add_argument("--no-antialias", action="store_true", help="resize to 299 px as TensorFlow 1 did")
    parser.add_argument("--features", type=int, default=2048, help="2048 (FID's); 64, 192, 768: cheaper (tests)")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--max-stored-features", type=int, default=2048,
                        help="keep every image's features up to this many images (else mu, sigma and a KID subset)")
    parser.add_argument("--kid-features", type=int, default=1000, help="KID subset size when not all are kept")
    parser.add_argument("--source-label", default=None, help="how the report names the images (default: SOURCE)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")


    try:
        extractor = InceptionFeatures(args.inception_weights, args.random_seed, antialias=not args.no_antialias,
                                      features=args.features)
        extractor.to(args.device)
        stats = compute_reference_stats(args.source, extractor, args.resolution, args.max_images, args.batch_size,
                                        max_stored_features=args.max_stored_features, kid_features=args.kid_features,
                                        label=args.source_label)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
    stats.save(args.out)
    print(f"wrote {args.out}: {stats.num_images} images at {stats.image_size} px, {_describe(stats.extractor)}")
    if extractor.random:
        print("these statistics come from a random-weight Inception: compare them only with features made the "
              "same way (FID and KID then measure nothing published)")


if __name__ == "__main__":
    main()
