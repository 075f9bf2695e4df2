"""Seconds per evaluation at the emoji demo's settings, and the share of the quick start it takes.

    OMP_NUM_THREADS=1 python scripts/measure_evaluation_cost.py [--repeats 2]

Builds the emoji experiment's stage-2 model as `python train.py experiment=emoji_ldm` composes it (the 4.5 M
U-Net, the 20.6 M open_clip text tower; random weights: the cost of sampling and measuring does not depend on
them) and times `Evaluator.evaluate_pipeline` with the experiment's evaluation settings (its 16 fixed prompts,
DDIM 25 steps, guidance 3, batch 64) for:

  top1              the quick start's default: the nearest training image (no weights needed)
  top1_fid_kid      + FID and KID: the 2048-feature Inception (seed-0 random weights, the cost of real ones)
                    against the shipped statistics of the 128 training emoji
  top1_fid_kid_clip + CLIP score with open_clip ViT-B-32 (random weights, the cost of real ones)

Each is timed `--repeats` times after one warm-up; the median is reported. Then the share of stage 2 of the
quick start (1000 steps; evaluations at the start and every 16,000 images = 5) at the stage-2 time the
README measured. Also the parts of the FID cost: the Inception network per image (channels_last, as
`InceptionFeatures` runs it, and the default contiguous layout) and torchmetrics' FID computation on 2048
features (an eigendecomposition of a 2048×2048 matrix, whatever the number of images).
Ends with `RESULT name=value` lines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGE2_SECONDS = 539  # stage 2 of the quick start on the 2-core CPU (README, "The quick-start results")
STAGE2_STEPS, BATCH = 1000, 64


def build_pipeline(data_dir: Path, workdir: Path):
    """The emoji_ldm model as train.py composes it, on a random-weight stage-1 autoencoder of the emoji shape."""
    import hydra
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ldm.config_resolvers import register_resolvers
    from ldm.modules.autoencoder import AutoencoderKL
    from ldm.pipeline import LatentDiffusionPipeline

    register_resolvers()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=emoji_ldm", "autoencoder.ckpt_path=x",
                                          f"paths.data_dir={data_dir}", "paths.root_dir=."],
                      return_hydra_config=False)
    ae_config = OmegaConf.to_container(compose_autoencoder_config(), resolve=True)
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(**ae_config)
    ckpt = workdir / "autoencoder.ckpt"
    state = {f"autoencoder.{k}": v for k, v in autoencoder.state_dict().items()}
    state["latent_std"] = torch.tensor(1.0)
    torch.save({"hyper_parameters": {"autoencoder": ae_config}, "state_dict": state}, ckpt)
    cfg.autoencoder.ckpt_path = str(ckpt)
    cfg.model.autoencoder_ckpt = str(ckpt)
    module = hydra.utils.get_class(cfg.model._target_).from_settings(cfg.model).eval()
    evaluation = OmegaConf.to_container(cfg.evaluation, resolve=True)
    prompts = list(cfg.model.sampling.prompts)
    data = hydra.utils.instantiate(cfg.data)  # builds the emoji shards on first use
    data.prepare_data()
    return LatentDiffusionPipeline.from_module(module, use_ema=True), evaluation, prompts


def compose_autoencoder_config():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=emoji_autoencoder"], return_hydra_config=False)
    return cfg.model.autoencoder


def time_evaluation(pipe, settings: dict, prompts: list[str], repeats: int) -> tuple[float, dict]:
    from ldm.evaluation import Evaluator

    evaluator = Evaluator(**settings)
    evaluator.prepare()
    metrics = evaluator.evaluate_pipeline(pipe, prompts)  # warm-up (and the first load of everything)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        metrics = evaluator.evaluate_pipeline(pipe, prompts)
        times.append(time.perf_counter() - start)
    return statistics.median(times), metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as workdir:
        pipe, evaluation, prompts = build_pipeline(args.data_dir, Path(workdir))
    evaluation.pop("_target_", None)
    base = {**evaluation, "inception": None, "clip": None}
    variants = {
        "top1": base,
        "top1_fid_kid": {**base, "inception": {**evaluation["inception"], "random_seed": 0}},
        "top1_fid_kid_clip": {**base, "inception": {**evaluation["inception"], "random_seed": 0},
                              "clip": {**evaluation["clip"], "random_seed": 0}},
    }
    evaluations = 1 + STAGE2_STEPS * BATCH // 16000  # at the start, then every 16,000 images
    results = {}
    for name, settings in variants.items():
        seconds, metrics = time_evaluation(pipe, settings, prompts, args.repeats)
        results[name] = seconds
        print(f"{name:18s} {seconds:6.1f} s per evaluation ({len(prompts)} prompts, {settings['steps']} DDIM steps); "
              f"{', '.join(f'{k}={v:.4g}' for k, v in metrics.items())}", flush=True)
    print(f"threads: {torch.get_num_threads()}; quick start stage 2: {STAGE2_SECONDS} s, {evaluations} evaluations")
    parts = measure_fid_parts(pipe, evaluation, prompts, args.repeats)
    for name, seconds in results.items():
        print(f"RESULT seconds_per_evaluation_{name}={seconds:.2f}")
        print(f"RESULT quickstart_stage2_share_{name}={evaluations * seconds / STAGE2_SECONDS:.3f}")
    for name, seconds in parts.items():
        print(f"RESULT {name}={seconds:.3f}")


def measure_fid_parts(pipe, evaluation: dict, prompts: list[str], repeats: int) -> dict[str, float]:
    from ldm.evaluation.fid import fid_kid
    from ldm.evaluation.inception import InceptionFeatures
    from ldm.evaluation.reference_stats import ReferenceStats

    images = pipe.generate(prompts, steps=2, seed=0, batch_size=64).images
    extractor = InceptionFeatures(random_seed=0)
    stats = ReferenceStats.load(evaluation["ref_stats"])
    features = extractor(images)
    parts = {}
    for layout, memory_format in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
        extractor.net.to(memory_format=memory_format)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            extractor(images)
            times.append(time.perf_counter() - start)
        parts[f"inception_seconds_per_image_{layout}"] = statistics.median(times) / len(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fid_kid(features, stats)
        times.append(time.perf_counter() - start)
    parts["fid_kid_compute_seconds"] = statistics.median(times)
    return parts


if __name__ == "__main__":
    main()
