"""Training throughput of a recipe on cached latents: images/s per GPU and MFU, against the anchors.

    python bench/recipe_throughput.py                            # sd2_base_256, 1 GPU, batch 32, 300 steps
    python bench/recipe_throughput.py --devices 8 --batch-per-device 32 --steps 300
    python bench/recipe_throughput.py --latents DIR --autoencoder AE --text-encoder FILE   # your own cache
    python bench/recipe_throughput.py --tiny --device cpu --steps 3 --warmup 1             # does it run (CPU)

Runs `train.py experiment=RECIPE` as a user would, on cached latents and text embeddings (data=latents: the
U-Net alone trains, as in the anchors' figures), with the sample-grid, evaluation and checkpoint callbacks off
and ldm.training.throughput.MeasureThroughput on. Without --latents it writes a synthetic cache (random latents,
random 1024-wide contexts with 10–30 attended tokens like real captions) and a random-weight KL-f8 autoencoder:
the step's cost does not depend on the values. The FLOPs per image are bench/flops.py's count of the U-Net
forward at 77 context tokens, times 3 for the training step; MFU divides by the GPU's dense bf16 peak.

Prints the measured figures, the anchors' and RESULT lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_recipes: the --tiny sizes, shared with the tests

from bench.flops import unet_forward_flops  # noqa: E402
from bench.recipe_costs import ANCHORS, PEAK, compose_recipe, recipe_costs  # noqa: E402

# Dense bf16 (= fp16) tensor-core peaks, FLOP/s, from NVIDIA's data sheets; matched against the device name in
# this order (the first match wins).
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
              ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12))


def peak_flops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_FLOPS if key in device_name), None)


def write_synthetic_cache(out: Path, samples: int, latent_size: int, context_dim: int, seed: int = 0) -> Path:
    """Cached-latent shards (the layout of python -m ldm.data.cache_latents) with random contents, float16."""
    from ldm.data.latents import npy_bytes
    from ldm.data.writer import TarShardWriter

    rng = np.random.default_rng(seed)
    with TarShardWriter(out, prefix="latents", shard_size=256) as writer:
        for i in range(samples):
            tokens = int(rng.integers(10, 31))  # BOS + caption + EOS of a typical LAION / COCO caption
            mask = np.zeros(77, dtype=bool)
            mask[:tokens] = True
            writer.write(f"{i:07d}", {
                "latent.npy": npy_bytes(rng.standard_normal((4, latent_size, latent_size)).astype(np.float16)),
                "std.npy": npy_bytes(np.full((4, latent_size, latent_size), 0.05, np.float16)),
                "context.npy": npy_bytes(rng.standard_normal((77, context_dim)).astype(np.float16)),
                "mask.npy": npy_bytes(mask),
                "txt": "synthetic caption",
            })
    return out


def write_random_autoencoder(out: Path, config: dict) -> Path:
    from ldm.modules.autoencoder import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(**config)
    state = {f"autoencoder.{k}": v for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": {"autoencoder": config}, "state_dict": state}, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="sd2_base_256")
    parser.add_argument("--devices", type=int, default=1, help="GPUs (processes) on this machine")
    parser.add_argument("--batch-per-device", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps in all")
    parser.add_argument("--warmup", type=int, default=50, help="steps left out of the timing")
    parser.add_argument("--precision", default=None, help="trainer.precision (default: the recipe's)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--peak-tflops", type=float, default=None, help="per device; default: from the GPU's name")
    parser.add_argument("--latents", help="a cache of python -m ldm.data.cache_latents (default: synthetic)")
    parser.add_argument("--autoencoder", help="autoencoder.ckpt_path (default: random KL-f8 weights)")
    parser.add_argument("--text-encoder", help="model.conditioner.pretrained (default: random weights)")
    parser.add_argument("--samples", type=int, default=1024, help="size of the synthetic cache")
    parser.add_argument("--workdir", default="runs/recipe_throughput")
    parser.add_argument("--tiny", action="store_true", help="the tests' CPU sizes (tests/tiny_recipes.py)")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides, e.g. model.compile=true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (--device cpu --tiny runs the CPU-sized check)")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    sizes: list[str] = []
    autoencoder_config = dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4)
    if args.tiny:
        import tiny_recipes as tiny

        arch, weights = tiny.sd2_text_tower(workdir / "text")
        sizes = [*tiny.STAGE2, *tiny.text_overrides(arch, weights)]
        autoencoder_config["ch"] = 32
    cfg = compose_recipe(args.recipe, sizes)
    resolution = int(cfg.data.resolution)
    latent = resolution // 8
    unet = dict(cfg.model.unet)
    forward = unet_forward_flops(unet, latent)
    train_flops = 3 * forward

    latents = Path(args.latents) if args.latents else workdir / f"latents_{resolution}px_{unet['context_dim']}"
    if not args.latents and not latents.exists():
        write_synthetic_cache(latents, args.samples, latent, int(unet["context_dim"]))
    autoencoder = args.autoencoder or str(workdir / f"autoencoder_ch{autoencoder_config['ch']}.ckpt")
    if not args.autoencoder and not Path(autoencoder).exists():
        write_random_autoencoder(Path(autoencoder), autoencoder_config)

    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(name) if args.device == "cuda" else None)
    out = workdir / "throughput.json"
    out.unlink(missing_ok=True)
    overrides = [
        f"experiment={args.recipe}", *sizes, "data=latents", f"data.train_shards={latents}",
        f"data.resolution={resolution}", f"autoencoder.ckpt_path={autoencoder}",
        f"global_batch_size={args.batch_per_device * args.devices}", f"trainer.devices={args.devices}",
        "trainer.num_nodes=1", "trainer.accumulate_grad_batches=1", f"trainer.max_steps={args.steps}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        "~callbacks.sample_images", "~callbacks.evaluation", "~callbacks.model_checkpoint",
        "+trainer.enable_checkpointing=false", "logger=csv", "trainer.enable_progress_bar=false",
        "+callbacks.throughput._target_=ldm.training.throughput.MeasureThroughput",
        f"+callbacks.throughput.warmup_steps={args.warmup}", f"+callbacks.throughput.flops_per_image={train_flops}",
        f"+callbacks.throughput.out={out}", f"hydra.run.dir={workdir / 'run'}",
    ]
    if peak:
        overrides.append(f"+callbacks.throughput.peak_flops={peak}")
    if args.precision:
        overrides.append(f"trainer.precision={args.precision}")
    if args.device == "cpu":
        overrides.append("data.num_workers=0")
    if args.text_encoder:
        overrides.append(f"model.conditioner.pretrained={args.text_encoder}")
    elif not args.tiny:
        # Random text-encoder weights: with cached contexts it only encodes "" (for dropped captions), so its
        # weights do not change the step's cost; the recipe would otherwise require them.
        overrides += ["model.conditioner.pretrained=null", "~required"]
    overrides += args.overrides
    command = [sys.executable, str(ROOT / "train.py"), *overrides]
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0 or not out.is_file():
        sys.exit(f"train.py failed ({proc.returncode}); see {workdir / 'run'}")
    result = json.loads(out.read_text())
    print(f"\n## {args.recipe} throughput, {result['device']} × {args.devices}, {resolution}² "
          f"({latent}×{latent} latents), batch {args.batch_per_device} per device, {result['precision']}, "
          f"steps {args.warmup + 1}–{args.steps} timed ({time.perf_counter() - started:.0f} s in all)")
    print(f"U-Net forward {forward / 1e9:,.1f} GFLOP per image (77 context tokens), training ×3 = "
          f"{train_flops / 1e9:,.1f} GFLOP")
    print("| measure | value |\n|---|---|")
    for key in ("images_per_s_per_device", "images_per_s", "seconds_per_step", "tflops_per_device", "mfu",
                "max_memory_allocated_gib"):
        if key in result:
            print(f"| {key} | {result[key]:.4g} |")
    # The anchors in the same units: MFU compares across GPUs and resolutions, images/s only within them.
    print("\n| | images/s per GPU | TFLOP/s per GPU (3 × U-Net forward) | MFU |\n|---|---|---|---|")
    mfu = f"{result['mfu']:.1%}" if "mfu" in result else "—"
    print(f"| measured: {args.recipe} {resolution}², {result['device']} | {result['images_per_s_per_device']:,.1f} | "
          f"{result['images_per_s_per_device'] * train_flops / 1e12:,.1f} | {mfu} |")
    for recipe in ("sd2_base_256", "sd2_v_512"):
        costs, anchor = recipe_costs(recipe), ANCHORS[recipe]
        for gpu, rate in {anchor["gpu"]: anchor["images_per_s_per_gpu"], **anchor.get("also", {})}.items():
            tflops = rate * costs["train_flops"] / 1e12
            print(f"| anchor: {recipe} {costs['resolution']}², {gpu} | {rate:,.1f} | {tflops:,.1f} | "
                  f"{tflops * 1e12 / PEAK[gpu]:.1%} |")
    anchor = ANCHORS.get(args.recipe)
    if anchor:
        print(f"\nanchor of {args.recipe}: {anchor['throughput_note']}")
        print(f"RESULT anchor_images_per_s_per_gpu={anchor['images_per_s_per_gpu']:.6g}")
    print(f"RESULT images_per_s_per_device={result['images_per_s_per_device']:.6g}")
    print(f"RESULT seconds_per_step={result['seconds_per_step']:.6g}")
    print(f"RESULT train_gflops_per_image={train_flops / 1e9:.6g}")
    if "mfu" in result:
        print(f"RESULT mfu={result['mfu']:.6g}")


if __name__ == "__main__":
    main()
