"""Image quality of a model: sample a fixed prompt set with fixed seeds, then measure the images.

    evaluator = Evaluator(inception={"weights": "pt_inception-2015-12-05-6726825d.pth"}, ref_stats="coco.npz",
                          clip={"arch": "ViT-H-14", "weights": "open_clip_vit_h14.bin"}, steps=50, cfg_scale=7.5)
    metrics = evaluator.evaluate_pipeline(LatentDiffusionPipeline.from_checkpoint(path), prompts)

Measures, each on only when what it needs is given:
  fid, kid, kid_std   Inception features against reference statistics (``inception`` + ``ref_stats``)
  clip_score          mean cosine similarity of image and prompt under an open_clip model (``clip``)
  top1                share of samples whose nearest training image is their prompt's (``nearest``, the emoji demo)
  heldout_psnr        autoencoder reconstructions of held-out images (``evaluate_autoencoder``, stage 1)

Inception and CLIP weights come from local files. Without them a measure is off, and says so; with
``random_seed`` instead it runs on seeded random weights, and says that its numbers only compare with each
other.

In a multi-process run (torch.distributed initialised) the prompts are split over the ranks in contiguous
parts, each keeping the seeds it would have in one process, and the per-image features, scores and hits are
gathered before anything is computed: every rank gets the numbers one process would.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ldm.evaluation.clip_score import CLIPScorer
from ldm.evaluation.emoji import NearestTrainingImage, reconstruction_psnr
from ldm.evaluation.fid import fid_kid
from ldm.evaluation.inception import InceptionFeatures
from ldm.evaluation.reference_stats import ReferenceStats

log = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(values: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``values`` (any length along dim 0) in rank order; as is in one process."""
    _, world = rank_and_world()
    if world == 1:
        return values
    from torchmetrics.utilities.distributed import gather_all_tensors

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return torch.cat([t.cpu() for t in gather_all_tensors(values.to(device))])


def rank_share(num: int, rank: int, world: int) -> range:
    """The contiguous part [start, end) of ``num`` items that ``rank`` takes."""
    return range(num * rank // world, num * (rank + 1) // world)


class Evaluator:
    def __init__(
        self,
        inception: dict | None = None,
        ref_stats: str | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        clip: dict | None = None,
        nearest: dict | None = None,
        n_per_prompt: int = 1,
        steps: int = 50,
        sampler: str = "ddim",
        cfg_scale: float | None = None,
        seed: int = 0,
        batch_size: int = 16,
    ):
        """
        inception: {weights: local file | null, random_seed: int | null, antialias, features}; FID/KID need it and
            ``ref_stats`` (an .npz of ``python -m ldm.evaluation.reference_stats`` made by the same extractor).
        clip: {arch, weights: local open_clip checkpoint | null, random_seed: int | null}.
        nearest: {shards, resolution}: training images with their captions, for the top-1 rate.
        n_per_prompt, steps, sampler, cfg_scale (null: the model's), seed, batch_size: sampling; image i of the
            whole prompt set starts from seed + i whatever the number of processes.
        """
        self.inception_cfg = _enabled(inception)
        self.ref_stats_path = ref_stats
        self.kid_subsets, self.kid_subset_size = int(kid_subsets), int(kid_subset_size)
        self.clip_cfg = _enabled(clip)
        self.nearest_cfg = dict(nearest) if nearest and nearest.get("shards") else None
        self.sampling = dict(n=int(n_per_prompt), steps=int(steps), sampler=sampler, cfg_scale=cfg_scale,
                             seed=int(seed), batch_size=int(batch_size))
        self._inception = self._stats = self._clip = self._nearest = None
        self._said = False

    # -- what runs -----------------------------------------------------------------------------------------------

    def status(self) -> list[str]:
        """One line per measure: on (with what), on random weights, or off and why."""
        lines = []
        if self.inception_cfg is None:
            lines.append("FID/KID off: no Inception weights (set inception.weights to a local "
                         "pt_inception-2015-12-05-6726825d.pth, or inception.random_seed for self-consistent numbers)")
        elif not self.ref_stats_path:
            lines.append("FID/KID off: no reference statistics (set ref_stats to an .npz of "
                         "python -m ldm.evaluation.reference_stats)")
        elif self.inception_cfg.get("weights"):
            lines.append(f"FID/KID on: Inception weights {self.inception_cfg['weights']}, reference {self.ref_stats_path}")
        else:
            lines.append(f"FID/KID on RANDOM Inception weights (seed {self.inception_cfg['random_seed']}): the "
                         "numbers only compare with each other, not with any published FID")
        if self.clip_cfg is None:
            lines.append("CLIP score off: no CLIP weights (set clip.weights to a local open_clip checkpoint, or "
                         "clip.random_seed for self-consistent numbers)")
        elif self.clip_cfg.get("weights"):
            lines.append(f"CLIP score on: open_clip {self.clip_cfg.get('arch')} from {self.clip_cfg['weights']}")
        else:
            lines.append(f"CLIP score on RANDOM open_clip {self.clip_cfg.get('arch')} weights (seed "
                         f"{self.clip_cfg['random_seed']}): the numbers only compare with each other")
        if self.nearest_cfg:
            lines.append(f"top-1 nearest training image on: {self.nearest_cfg['shards']}")
        return lines

    def say_status(self) -> None:
        if not self._said and rank_and_world()[0] == 0:
            for line in self.status():
                log.info("evaluation: %s", line)
        self._said = True

    @property
    def has_measures(self) -> bool:
        """False when nothing is configured: sampling would measure nothing, so the callback skips it."""
        return self.fid_enabled or self.clip_cfg is not None or self.nearest_cfg is not None

    @property
    def fid_enabled(self) -> bool:
        return self.inception_cfg is not None and bool(self.ref_stats_path)

    # -- the parts, built on first use ---------------------------------------------------------------------------

    def inception(self, device: torch.device):
        if self._inception is None:
            cfg = self.inception_cfg
            self._inception = InceptionFeatures(cfg.get("weights"), cfg.get("random_seed"),
                                                antialias=bool(cfg.get("antialias", True)),
                                                features=int(cfg.get("features", 2048)))
            self._stats = ReferenceStats.load(self.ref_stats_path)
            self._stats.check(self._inception.identity, None, self.ref_stats_path)
        return self._inception.to(device)

    def clip(self, device: torch.device):
        if self._clip is None:
            cfg = self.clip_cfg
            self._clip = CLIPScorer(cfg.get("arch", "ViT-H-14"), cfg.get("weights"), cfg.get("random_seed"))
        return self._clip.to(device)

    def nearest(self) -> NearestTrainingImage:
        if self._nearest is None:
            self._nearest = NearestTrainingImage.from_shards(self.nearest_cfg["shards"],
                                                             int(self.nearest_cfg["resolution"]))
        return self._nearest

    def prepare(self, device: torch.device | str = "cpu") -> None:
        """Build every enabled part now (weights, reference statistics, training images), so that a missing file
        fails before training starts rather than at the first evaluation."""
        device = torch.device(device)
        if self.fid_enabled:
            self.inception(device)
        if self.clip_cfg is not None:
            self.clip(device)
        if self.nearest_cfg:
            self.nearest()

    # -- measuring -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_pipeline(self, pipe, prompts: list[str]) -> dict[str, float]:
        """Samples ``prompts`` (this rank's part of them) and measures the images; every rank returns the same
        numbers. ``pipe``: a ``LatentDiffusionPipeline``."""
        self.say_status()
        if not prompts:
            raise ValueError("evaluation needs at least one prompt")
        started = time.perf_counter()
        rank, world = rank_and_world()
        n = self.sampling["n"]
        share = rank_share(len(prompts), rank, world)
        mine = [prompts[i] for i in share]
        options = dict(self.sampling)
        options["seed"] += share.start * n  # the seeds these images have in a one-process run
        device = pipe.device
        if mine:
            result = pipe.generate(mine, **options)
            images, image_prompts = result.images, result.prompts
        else:  # more ranks than prompts: this rank still joins every gather
            images, image_prompts = torch.zeros(0, 3, pipe.image_size, pipe.image_size), []
        metrics: dict[str, float] = {}
        if self.fid_enabled:
            extractor = self.inception(device)
            self._stats.check(extractor.identity, int(pipe.image_size), self.ref_stats_path)
            features = extractor(images) if len(images) else torch.zeros(0, extractor.identity["features"])

            metrics.update(fid_kid(gather(features.cpu().double()), self._stats, self.kid_subsets,
                                   self.kid_subset_size, seed=self.sampling["seed"]))
        if self.clip_cfg is not None:
            scores = self.clip(device)(images, image_prompts) if len(images) else torch.zeros(0)
            metrics["clip_score"] = float(gather(scores.cpu().double()).mean())
        if self.nearest_cfg:
            hits = self.nearest().hits(images, image_prompts) if len(images) else torch.zeros(0, dtype=torch.bool)
            metrics["top1"] = float(gather(hits.double()).mean())
        metrics["num_images"] = float(len(prompts) * n)
        metrics["seconds"] = time.perf_counter() - started
        return metrics

    @torch.no_grad()
    def evaluate_autoencoder(self, autoencoder, images: torch.Tensor) -> dict[str, float]:
        """PSNR of reconstructions (posterior mode) of ``images`` (every rank passes the same ones; each
        reconstructs its part)."""
        started = time.perf_counter()
        share = rank_share(len(images), *rank_and_world())
        part = images[share.start:share.stop]
        values = reconstruction_psnr(autoencoder, part) if len(part) else torch.zeros(0)
        return {"heldout_psnr": float(gather(values.double()).mean()), "num_images": float(len(images)),
                "seconds": time.perf_counter() - started}


def _enabled(cfg: dict | None) -> dict | None:
    """A weights config that names a file or a seed; None when it names neither (the measure is off)."""
    if not cfg:
        return None
    cfg = dict(cfg)
    if cfg.get("weights") and cfg.get("random_seed") is not None:
        raise ValueError("give either weights (a local file) or random_seed, not both")
    if cfg.get("weights"):
        cfg["weights"] = str(Path(cfg["weights"]).expanduser())
        return cfg
    return cfg if cfg.get("random_seed") is not None else None
