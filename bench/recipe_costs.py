"""What each Stable Diffusion recipe (configs/experiment/sd*.yaml) costs: FLOPs per image, GPU-hours at the
anchors' measured throughput, and the commands for 8 and 64 GPUs.

    python bench/recipe_costs.py            # Markdown tables and commands, then RESULT lines

FLOPs: the U-Net forward per image from bench/flops.py (analytic, 77 context tokens) at the recipe's resolution;
a training step costs 3× the forward (the backward computes gradients for the inputs and the weights of each
layer). The autoencoder's training step (encoder, decoder, LPIPS, discriminator, forward and backward) is
counted by torch's FlopCounterMode on meta tensors. GPU-hours = images / (images/s per GPU) / 3600, at the
throughput the anchor measured, with perfect scaling over GPUs; "implied MFU" is that throughput's share of the
GPU's dense bf16 peak. Only arithmetic on the configs: runs on any machine in seconds.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.flops import unet_forward_flops  # noqa: E402

RECIPES = ("sd2_base_256", "sd2_v_512", "sd_autoencoder_f8", "sd_finetune_512")
PEAK = {"A100": 312e12, "H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core FLOP/s (NVIDIA data sheets)

# The anchors' numbers. images: what the anchor trains (or needs to reach its target); throughput: images/s per
# GPU that the anchor measured for this work.
ANCHORS: dict[str, dict[str, Any]] = {
    "sd2_base_256": {
        "images": 550_000 * 2048,
        "images_note": "550,000 steps × 2,048 (mosaicml/diffusion SD-2-base-256.yaml; their README: 1,126,400,000)",
        "gpu": "A100", "images_per_s_per_gpu": 1100 / 8,
        "throughput_note": "mosaicml/diffusion README: 1,100 images/s on 8 A100s at 256², U-Net only on "
                           "precomputed latents (encoding them on the fly costs 1.4× the time)",
    },
    "sd2_v_512": {
        "images": 2_560_000,
        "images_note": "MLPerf's quality target (FID ≤ 90, CLIP ≥ 0.15) at global batch 512: met at 2.56 M images "
                       "in most reference runs, 3.07 M in the slowest (README 'Reference runs'); the recipe's "
                       "full length is 5.12 M",
        "gpu": "H100", "images_per_s_per_gpu": 136.0,
        "also": {"H200": 150.0},
        "throughput_note": "the best MLPerf Training Stable Diffusion submissions per GPU: about 136 images/s per "
                           "H100 and 150 per H200 at 512², U-Net only on cached latents and text embeddings",
    },
    "sd_finetune_512": {
        "images": 15_000 * 32,
        "images_note": "15,000 steps × 32 (diffusers examples/text_to_image: --max_train_steps=15000; 4 per GPU "
                       "on 8 GPUs)",
        "gpu": "H100", "images_per_s_per_gpu": 136.0 / 1.4, "estimate": True,
        "throughput_note": "no anchor measures fine-tuning; estimated as MLPerf's 136 images/s per H100 at 512² "
                           "divided by mosaic's 1.4 for encoding images and captions at every step (this recipe "
                           "reads images)",
    },
    "sd_autoencoder_f8": {
        "images": None, "images_note": "CompVis's config sets no length and no anchor reports a throughput",
        "gpu": None, "images_per_s_per_gpu": None, "throughput_note": "none",
    },
}

# What each recipe needs on the command line (placeholders), and the per-GPU micro-batch its anchor fits in
# 80 GB (40 GB for mosaic's A100s): the commands add gradient accumulation above it.
REQUIRED = {
    "sd2_base_256": "data.train_shards=/data/laion-latents-256 autoencoder.ckpt_path=/ckpt/stable-diffusion-2-base "
                    "model.conditioner.pretrained=/ckpt/open_clip_vit_h14.bin",
    "sd2_v_512": "data.train_shards=/data/laion400m-latents-512 autoencoder.ckpt_path=/ckpt/512-base-ema.safetensors "
                 "model.conditioner.pretrained=/ckpt/512-base-ema.safetensors",
    "sd_autoencoder_f8": "data.train_shards='/data/images/{00000..01023}.tar' "
                         "model.loss.lpips_vgg_path=/ckpt/vgg16-397923af.pth "
                         "model.loss.lpips_lin_path=/ckpt/lpips_vgg_v0.1.pth",
    "sd_finetune_512": "init_from=/models/stable-diffusion-2-1-base data.train_shards='/data/mine/{00000..00099}.tar'",
}
MICRO_BATCH = {"sd2_base_256": 16, "sd2_v_512": 8, "sd_autoencoder_f8": 12, "sd_finetune_512": 4}


def compose_recipe(name: str, overrides: list[str] | tuple[str, ...] = ()):
    """The recipe's config as train.py composes it (unresolved; the keys used here resolve on their own)."""
    from hydra import compose, initialize_config_dir

    from ldm.config_resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", *overrides])


def autoencoder_train_flops(autoencoder: dict, resolution: int, disc_channels: int = 64, disc_layers: int = 3) -> int:
    """FLOPs of one stage-1 training step per image once the discriminator is on: autoencoder forward, LPIPS
    (VGG16 on input and reconstruction), the discriminator on the reconstruction (generator term) and on both
    (its own loss), and the backward of all of it, counted by torch on meta tensors."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision.models.vgg import cfgs, make_layers

    from ldm.modules.autoencoder import AutoencoderKL
    from ldm.modules.discriminator import NLayerDiscriminator

    with torch.device("meta"):
        model = AutoencoderKL(**autoencoder)
        vgg = make_layers(cfgs["D"])[:30].requires_grad_(False)
        disc = NLayerDiscriminator(3, disc_channels, disc_layers)
        x = torch.randn(1, 3, resolution, resolution)
    with FlopCounterMode(display=False) as counter:
        x_rec, posterior = model(x)
        loss = (x - x_rec).abs().sum() + (vgg(x) - vgg(x_rec)).pow(2).sum() + posterior.kl().sum()
        loss = loss - disc(x_rec).mean()
        loss = loss + disc(x).mean() + disc(x_rec.detach()).mean()
        loss.backward()
    return counter.get_total_flops()


def plan(global_batch: int, gpus: int, micro: int) -> tuple[int, int, int]:
    """(global batch, accumulation, per-GPU batch) for `gpus` GPUs, keeping per-GPU batches ≤ micro. A global
    batch smaller than the GPU count, or not divisible by it, grows to gpus × micro."""
    if global_batch % gpus:
        global_batch = gpus * micro
    per_gpu = global_batch // gpus
    accumulate = next(a for a in range(1, per_gpu + 1) if per_gpu % a == 0 and per_gpu // a <= micro)
    return global_batch, accumulate, per_gpu // accumulate


def commands(name: str, global_batch: int, gpu_hours: float | None, run_gpu_hours: float | None) -> list[str]:
    """torchrun and SLURM commands for 8 and 64 GPUs. gpu_hours: to the anchor's image count; run_gpu_hours: the
    recipe's whole length (trainer.max_steps), which sets SLURM's time limit."""
    lines = []
    for gpus in (8, 64):
        nodes = gpus // 8
        batch, accumulate, per_gpu = plan(global_batch, gpus, MICRO_BATCH[name])
        extra = [f"trainer.devices=8 trainer.num_nodes={nodes}"]
        if batch != global_batch:
            extra.append(f"global_batch_size={batch}")
        if accumulate > 1:
            extra.append(f"trainer.accumulate_grad_batches={accumulate}")
        args = f"experiment={name} {REQUIRED[name]} {' '.join(extra)}"
        # A recipe whose length is in steps trains on more images when its batch grows to fill the GPUs.
        scale = batch / global_batch
        wall = f", about {hours(gpu_hours * scale / gpus)} at the anchor's throughput" if gpu_hours else ""
        if gpu_hours and run_gpu_hours and run_gpu_hours > gpu_hours * 1.01:
            wall += f" ({hours(run_gpu_hours * scale / gpus)} for all of trainer.max_steps)"
        if batch != global_batch:
            wall += f" (the recipe's steps at {batch} images each)"
        lines.append(f"# {gpus} GPUs ({nodes} × 8): global batch {batch} = {gpus} × {per_gpu} × {accumulate} "
                     f"accumulated{wall}")
        launch = "--standalone" if nodes == 1 else f"--nnodes {nodes} --node_rank $NODE_RANK --master_addr $MAIN_ADDR " \
                                                   "--master_port 29500"
        lines.append(f"torchrun {launch} --nproc_per_node 8 train.py {args} hydra.run.dir=/shared/runs/{name}")
        # SLURM's limit: 1.2 × the estimated time, from 1 h to 2 days (resume longer runs with ckpt_path=...)
        run = (run_gpu_hours or gpu_hours or 0) * scale / gpus
        timeout = 2880 if not run else min(2880, max(60, math.ceil(run * 60 * 1.2)))
        lines.append(f"python train.py -m hydra/launcher=slurm {args} hydra.launcher.partition=gpu "
                     f"hydra.launcher.timeout_min={timeout}")
    return lines


def recipe_costs(name: str) -> dict[str, Any]:
    cfg = compose_recipe(name)
    resolution = int(cfg.data.resolution)
    anchor = ANCHORS[name]
    out: dict[str, Any] = {"name": name, "resolution": resolution, "global_batch": int(cfg.global_batch_size)}
    if name == "sd_autoencoder_f8":
        loss = cfg.model.loss
        out["train_flops"] = autoencoder_train_flops(dict(cfg.model.autoencoder), resolution,
                                                     int(loss.disc_channels), int(loss.disc_layers))
        out["forward_flops"] = None
    else:
        unet = dict(cfg.model.unet)
        if name == "sd_finetune_512":
            from ldm.convert.infer import UNET_PRESETS

            unet = {**unet, **UNET_PRESETS["sd2"]}  # init_from decides; SD2-base assumed (SD1's is within 0.2 %)
        out["forward_flops"] = unet_forward_flops(unet, resolution // 8)
        out["train_flops"] = 3 * out["forward_flops"]
    rate = anchor["images_per_s_per_gpu"]
    out["gpu_hours"] = anchor["images"] / rate / 3600 if rate and anchor["images"] else None
    run_images = int(cfg.trainer.max_steps) * out["global_batch"]
    out["run_gpu_hours"] = run_images / rate / 3600 if rate else None
    # An estimated throughput implies nothing about utilisation.
    out["implied_mfu"] = rate * out["train_flops"] / PEAK[anchor["gpu"]] if rate and not anchor.get("estimate") \
        else None
    out["commands"] = commands(name, out["global_batch"], out["gpu_hours"], out["run_gpu_hours"])
    return out


def hours(h: float) -> str:
    return f"{h:,.1f} h" if h >= 1 else f"{h * 60:,.0f} min"


def h100_estimate(results: list[dict]) -> dict[str, float]:
    """sd2_base_256 on H100s, estimated: MLPerf's 136 images/s per H100 at 512² as TFLOP/s, at 256²'s FLOPs."""
    by_name = {r["name"]: r for r in results}
    tflops = ANCHORS["sd2_v_512"]["images_per_s_per_gpu"] * by_name["sd2_v_512"]["train_flops"]
    rate = tflops / by_name["sd2_base_256"]["train_flops"]
    return {"images_per_s": rate, "hours": ANCHORS["sd2_base_256"]["images"] / rate / 3600, "tflops": tflops / 1e12}


def main() -> None:
    results = [recipe_costs(name) for name in RECIPES]
    estimate = h100_estimate(results)
    for r in results:
        anchor = ANCHORS[r["name"]]
        print(f"### {r['name']} ({r['resolution']}², global batch {r['global_batch']})\n")
        print("| | |\n|---|---|")
        if r["forward_flops"]:
            print(f"| U-Net forward per image (bench/flops.py) | {r['forward_flops'] / 1e9:,.0f} GFLOP |")
            print(f"| training per image (3 × forward) | {r['train_flops'] / 1e9:,.0f} GFLOP |")
        else:
            print(f"| training step per image (FlopCounterMode, discriminator on) | {r['train_flops'] / 1e9:,.0f} "
                  "GFLOP |")
        images = f"{anchor['images']:,}" if anchor["images"] else "—"
        print(f"| images | {images}: {anchor['images_note']} |")
        if anchor["images_per_s_per_gpu"]:
            print(f"| throughput | {anchor['images_per_s_per_gpu']:,.1f} images/s per {anchor['gpu']}: "
                  f"{anchor['throughput_note']} |")
            if r["implied_mfu"]:
                print(f"| implied MFU (dense bf16 peak {PEAK[anchor['gpu']] / 1e12:,.0f} TFLOP/s) | "
                      f"{r['implied_mfu']:.1%} |")
            print(f"| {anchor['gpu']}-hours | {r['gpu_hours']:,.1f} |")
            for gpu, rate in anchor.get("also", {}).items():
                print(f"| {gpu}-hours ({rate:g} images/s) | {anchor['images'] / rate / 3600:,.1f} |")
            if r["name"] == "sd2_base_256":
                print(f"| H100-hours, estimated | {estimate['hours']:,.0f}: MLPerf's H100 rate as TFLOP/s "
                      f"({estimate['tflops']:,.0f}) at this resolution's FLOPs = {estimate['images_per_s']:,.0f} "
                      "images/s per H100 |")
        else:
            print("| GPU-hours | no anchor throughput: time a few hundred steps with the MeasureThroughput callback "
                  "(ldm/training/throughput.py) |")
        print("\n```bash")
        print("\n".join(r["commands"]))
        print("```\n")
    for r in results:
        key = r["name"]
        print(f"RESULT {key}_train_gflops_per_image={r['train_flops'] / 1e9:.6g}")
        if r["forward_flops"]:
            print(f"RESULT {key}_forward_gflops_per_image={r['forward_flops'] / 1e9:.6g}")
        if r["gpu_hours"]:
            print(f"RESULT {key}_{ANCHORS[key]['gpu'].lower()}_hours={r['gpu_hours']:.6g}")
            if r["implied_mfu"]:
                print(f"RESULT {key}_anchor_implied_mfu={r['implied_mfu']:.6g}")
        for gpu, rate in ANCHORS[key].get("also", {}).items():
            print(f"RESULT {key}_{gpu.lower()}_hours={ANCHORS[key]['images'] / rate / 3600:.6g}")
    print(f"RESULT sd2_base_256_h100_hours_estimated={estimate['hours']:.6g}")


if __name__ == "__main__":
    main()
