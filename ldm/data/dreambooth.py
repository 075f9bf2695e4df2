"""DreamBooth data (Ruiz et al. 2023): a few images of one subject, captioned with a prompt that names it by
a rare token ("a photo of sks dog"), and, for prior preservation, images of its class ("a photo of dog") made
by the model being fine-tuned before it is changed.

Both sets are small (a handful of instance images, a few hundred class images), so they are read from plain
folders and kept in memory as decoded images; no shards are needed (webdataset shards remain the format for
large-scale training). A batch holds the instance examples first, then as many class examples:

    {"image": (2B, 3, R, R), "caption": [instance prompt] * B + [class prompt] * B, "num_instance": B,
     "key": [file stems]}

Class images are generated where there are fewer than ``num_class_images`` in the class folder, once (by the
process that prepares data), and kept on disk: the next run with the same model and prompt finds them there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ldm.data.transforms import ImageTransform
from ldm.pipeline import LatentDiffusionPipeline

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def generate_class_images(pipe, folder: str | os.PathLike, prompt: str, num_images: int, image_size: int,
                          batch_size: int = 4, seed: int = 0, progress: bool = True, **generate_options) -> int:
    """Fills ``folder`` up to ``num_images`` images of ``prompt`` made by ``pipe``; returns how many it made.

    Class image i is drawn from seed ``seed + i``, so an interrupted fill resumes with the images it would
    have made. Each file is written under a temporary name first: a crash never leaves a truncated image.
    """
    from tqdm import tqdm

    folder = Path(folder)
    have = len(list_images(folder))
    missing = num_images - have
    if missing <= 0:
        logger.info("class images: %d in %s, enough for num_class_images=%d", have, folder, num_images)
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("class images: %d in %s, generating %d of %r", have, folder, missing, prompt)
    made = 0
    with tqdm(total=missing, desc="class images", disable=not progress) as bar:
        while made < missing:
            n = min(batch_size, missing - made)
            first = have + made
            result = pipe.generate([prompt], n=n, seed=seed + first, image_size=image_size, batch_size=n,
                                   **generate_options)
            for j, image in enumerate(result.pil()):
                index = first + j
                while (folder / f"class-{index:05d}.png").exists():  # a name a user's file already has
                    index += num_images
                tmp = folder / f".class-{index:05d}.png.tmp"
                image.save(tmp, format="PNG")
                os.replace(tmp, folder / f"class-{index:05d}.png")
            made += n
            bar.update(n)
    return made


def class_cache_key(model: str | None, prompt: str, resolution: int, sampling: dict) -> str:
    """A folder name for the class images of one model (path and modification time) and prompt."""
    stamp = ""
    if model is not None and Path(model).exists():
        stamp = f"{Path(model).resolve()}@{Path(model).stat().st_mtime_ns}"
    digest = hashlib.sha1(repr((stamp, prompt, resolution, sorted(sampling.items()))).encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "empty"
    return f"{slug}-{digest}"


class DreamBoothDataset(Dataset):
    """Instance example i % n_instance paired with class example i % n_class; length max(n_instance, n_class)
    (n_instance without class images), as in diffusers' train_dreambooth.py."""

    def __init__(self, instance_images: list[Path], instance_prompt: str, class_images: list[Path] | None,
                 class_prompt: str | None, transform: ImageTransform):
        self.transform = transform
        self.instance_prompt = instance_prompt
        self.class_prompt = class_prompt
        # Decoded once: the sets are small, and re-reading files every step would dominate a fast step.
        self.instance = [(p.stem, self._read(p)) for p in instance_images]
        self.classes = [(p.stem, self._read(p)) for p in class_images or []]

    @staticmethod
    def _read(path: Path) -> Image.Image:
        with Image.open(path) as image:
            image.load()
            return image.copy()

    def __len__(self) -> int:
        return max(len(self.instance), len(self.classes))

    def __getitem__(self, i: int) -> dict:
        key, image = self.instance[i % len(self.instance)]
        example = {"instance_image": self.transform(image), "instance_caption": self.instance_prompt,
                   "instance_key": f"instance/{key}"}
        if self.classes:
            key, image = self.classes[i % len(self.classes)]
            example.update(class_image=self.transform(image), class_caption=self.class_prompt,
                           class_key=f"class/{key}")
        return example


def collate(examples: list[dict]) -> dict:
    """Instance examples first, then the class examples (prior preservation splits the batch there)."""
    images = [e["instance_image"] for e in examples]
    captions = [e["instance_caption"] for e in examples]
    keys = [e["instance_key"] for e in examples]
    if "class_image" in examples[0]:
        images += [e["class_image"] for e in examples]
        captions += [e["class_caption"] for e in examples]
        keys += [e["class_key"] for e in examples]
    return {"image": torch.stack(images), "caption": captions, "key": keys, "num_instance": len(examples)}


class DreamBoothDataModule(L.LightningDataModule):
    """Instance images (and class images, generated where missing) for DreamBooth fine-tuning.

    Args:
        instance_data: folder with the subject's images. instance_prompt: their caption ("a photo of sks dog").
        class_prompt: the caption of class images ("a photo of dog"); needed with prior_preservation.
        class_data: folder of class images; null: ``cache_dir/<prompt>-<hash of model, prompt, resolution,
            sampling settings>``, so that runs on the same model and prompt share them.
        prior_preservation: add class examples to every batch (generating them if the folder is short).
        num_class_images: how many class images prior preservation uses (and generates if missing).
        resolution, random_crop, flip_prob: as for shards (shorter side resized, then cropped).
        batch_size: instance examples per batch (plus as many class examples).
        sample_batch_size: images per generation batch when making class images.
        init_from: the model being fine-tuned (part of the class-image cache key).
        class_seed: class image i is generated from seed class_seed + i.
    """

    def __init__(
        self,
        instance_data: str,
        instance_prompt: str,
        class_prompt: str | None = None,
        class_data: str | None = None,
        prior_preservation: bool = True,
        num_class_images: int = 200,
        resolution: int = 512,
        batch_size: int = 1,
        num_workers: int = 0,
        random_crop: bool = False,
        flip_prob: float = 0.0,
        sample_batch_size: int = 4,
        cache_dir: str | None = None,
        init_from: str | None = None,
        class_seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if not instance_prompt:
            raise ValueError("instance_prompt is empty: give the subject's prompt, e.g. instance_prompt=\"a photo of "
                             "sks dog\"")
        if prior_preservation and not class_prompt:
            raise ValueError("prior_preservation=true needs class_prompt (e.g. class_prompt=\"a photo of dog\"), or "
                             "set prior_preservation=false")
        if prior_preservation and num_class_images < 1:
            raise ValueError(f"num_class_images must be >= 1 with prior_preservation, got {num_class_images}")
        if prior_preservation and class_data is None and cache_dir is None:
            raise ValueError("prior preservation needs class_data=DIR or a cache_dir for generated class images")
        self.instance_data = Path(instance_data).expanduser()
        self.instance_prompt = instance_prompt
        self.class_prompt = class_prompt
        self.class_data = None if class_data is None else Path(class_data).expanduser()
        self.prior_preservation = prior_preservation
        self.num_class_images = num_class_images
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.transform = ImageTransform(resolution, random_crop=random_crop, flip_prob=flip_prob)
        self.sample_batch_size = sample_batch_size
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self.init_from = init_from
        self.class_seed = class_seed
        self.progress = progress
        self.dataset: DreamBoothDataset | None = None

    def instance_images(self) -> list[Path]:
        if not self.instance_data.is_dir():
            raise FileNotFoundError(f"instance_data not found (a folder of images): {self.instance_data}")
        images = list_images(self.instance_data)
        if not images:
            raise ValueError(f"instance_data {self.instance_data} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return images

    def _module(self):
        trainer = getattr(self, "trainer", None)
        return None if trainer is None else trainer.lightning_module

    def sampling(self) -> dict:
        """The settings class images are made with: the model's sampling defaults (model.sampling)."""
        module = self._module()
        sampling = dict(module.hparams.get("sampling") or {}) if module is not None else {}
        return {k: sampling[k] for k in ("sampler", "steps", "eta", "cfg_scale") if k in sampling}

    def class_dir(self) -> Path:
        if self.class_data is not None:
            return self.class_data
        return self.cache_dir / class_cache_key(self.init_from, self.class_prompt, self.resolution, self.sampling())

    def prepare_data(self) -> None:
        """Runs once per node before training: checks the instance images and fills the class folder."""
        self.instance_images()
        if not self.prior_preservation:
            return
        folder = self.class_dir()
        if len(list_images(folder)) >= self.num_class_images:
            logger.info("class images: using %d from %s", self.num_class_images, folder)
            return
        module = self._module()
        if module is None:
            raise ValueError(f"{folder} has fewer than num_class_images={self.num_class_images} class images and no "
                             "model is attached to generate them (run through a Trainer)")
        self.generate_class_images(module, folder)

    def generate_class_images(self, module, folder: Path) -> int:
        """Makes the missing class images with ``module`` as it is now: the base model, before any step."""
        device = self.trainer.strategy.root_device if getattr(self, "trainer", None) is not None else module.device
        was_training = module.training
        module.to(device)
        try:
            pipe = LatentDiffusionPipeline.from_module(module, use_ema=False)
            return generate_class_images(pipe, folder, self.class_prompt, self.num_class_images, self.resolution,
                                         batch_size=self.sample_batch_size, seed=self.class_seed,
                                         progress=self.progress, **self.sampling())
        finally:
            module.train(was_training)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        class_images = None
        if self.prior_preservation:
            folder = self.class_dir()
            class_images = list_images(folder)[: self.num_class_images]
            if not class_images:
                raise ValueError(f"no class images in {folder} (prepare_data generates them)")
        self.dataset = DreamBoothDataset(self.instance_images(), self.instance_prompt, class_images,
                                         self.class_prompt, self.transform)
        logger.info("DreamBooth data: %d instance images of %r, %s", len(self.dataset.instance),
                    self.instance_prompt,
                    f"{len(self.dataset.classes)} class images of {self.class_prompt!r}" if class_images
                    else "no prior preservation")

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            self.setup("fit")
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          collate_fn=collate, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())
