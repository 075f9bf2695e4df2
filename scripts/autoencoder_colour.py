"""How well a stage-1 autoencoder keeps colour, on the 16 held-out emoji and on flat colour squares.

    # measure checkpoints
    python scripts/autoencoder_colour.py --ckpt runs/ae/checkpoints/last.ckpt [--ckpt ...]
    # train with train.py (one run per seed, as subprocesses), then measure; extra arguments are Hydra overrides
    python scripts/autoencoder_colour.py --train runs/colour/l2 --seeds 0,1 model.loss.rec_loss=l2
    # the palette of training sets: the share of their coloured pixels in each hue bin
    python scripts/autoencoder_colour.py --hues-of data/emoji_32px_all_tones-all data/emoji_32px_all_tones-one

Measures (ldm/evaluation/colour.py), on reconstructions from the posterior mode:
- PSNR (dB) over whole images;
- chroma ratio: mean chroma (max − min of 0–255 RGB) of the reconstructions / that of the inputs, on the
  inputs' coloured pixels (chroma ≥ 32); colour MAE (0–255) and hue error (degrees) on the same pixels;
- the same per hue bin of the input (red, orange, yellow, green, cyan, blue, purple, pink, brown/skin, grey,
  white), pooled over the checkpoints;
- flat squares (pure and OpenMoji-palette red, green, blue, yellow, purple) on white: the mean colour the
  decoder paints inside each.
With several checkpoints (seeds) the summary gives the mean and each value. Ends with `RESULT name=value`
lines (means over the checkpoints; `_seed<i>`-suffixed ones per checkpoint).
A run trained here records its wall time (DIR/seed<S>/train_seconds.txt) and is reused unless --retrain.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.evaluation.colour import (  # noqa: E402
    CHROMA_MIN,
    CHROMATIC_BINS,
    HUE_BINS,
    colour_fidelity,
    flat_squares,
    hsv,
    hue_bin,
    hue_distance,
    square_colour,
    to_255,
)
from ldm.evaluation.emoji import psnr  # noqa: E402
from ldm.model_parts import load_autoencoder  # noqa: E402
from ldm.run_folder import saved_config  # noqa: E402

# (name, 0–255 RGB): the pure primaries and secondaries, then OpenMoji's own palette (the colours it draws with).
SQUARES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (255, 0, 0)),
    ("green", (0, 255, 0)),
    ("blue", (0, 0, 255)),
    ("yellow", (255, 255, 0)),
    ("purple", (128, 0, 255)),
    ("OpenMoji red D22F27", (210, 47, 39)),
    ("OpenMoji green 5C9E31", (92, 158, 49)),
    ("OpenMoji blue 1E50A0", (30, 80, 160)),
    ("OpenMoji yellow FCEA2B", (252, 234, 43)),
    ("OpenMoji purple B399C8", (179, 153, 200)),
)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def holdout_of(ckpt: Path, given: str | None) -> tuple[str, int]:
    """(held-out shards, resolution): --holdout, else the val_shards of the run the checkpoint belongs to."""
    cfg = saved_config(ckpt.resolve().parents[1])
    resolution = int(cfg.data.resolution) if cfg is not None else 32
    if given:
        return given, resolution
    if cfg is None:
        fail(f"{ckpt} is not inside a train.py run folder (no ../../.hydra/config.yaml): pass --holdout SHARDS")
    return str(cfg.data.val_shards), resolution


def read_images(shards: str, resolution: int) -> torch.Tensor:
    from ldm.data.shards import ShardDataset

    try:
        samples = list(ShardDataset(shards, resolution=resolution, shuffle=False, resampled=False))
    except (FileNotFoundError, ValueError, RuntimeError) as exn:
        fail(f"cannot read the held-out emoji from {shards}: {exn}")
    return torch.stack([s["image"] for s in samples])


def train(out: Path, seed: int, experiment: str, overrides: list[str], retrain: bool) -> Path:
    run_dir = out / f"seed{seed}"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file() and not retrain:
        print(f"reusing {ckpt}", flush=True)
        return ckpt
    command = [sys.executable, "train.py", f"experiment={experiment}", f"hydra.run.dir={run_dir}", f"seed={seed}",
               "trainer.enable_progress_bar=false", *overrides]
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    log_path = out / f"seed{seed}.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-3:]
        fail(f"train.py failed (exit {result.returncode}), see {log_path}: {' | '.join(tail)}")
    (run_dir / "train_seconds.txt").write_text(f"{seconds:.1f}\n")
    print(f"trained in {seconds:.0f} s", flush=True)
    return ckpt


@torch.no_grad()
def measure(ckpt: Path, holdout: str | None) -> dict:
    if not ckpt.is_file():
        fail(f"no checkpoint at {ckpt}")
    try:
        autoencoder, config, _ = load_autoencoder(str(ckpt))
    except (ValueError, KeyError, RuntimeError) as exn:
        fail(f"{ckpt}: {exn}")
    autoencoder.eval()
    shards, resolution = holdout_of(ckpt, holdout)
    x = read_images(shards, resolution)
    x_rec = autoencoder.decode(autoencoder.encode(x).mode())
    overall, per_bin = colour_fidelity(x, x_rec)

    colours = torch.tensor([c for _, c in SQUARES], dtype=torch.float32)
    squares = flat_squares(colours, size=resolution, side=resolution * 5 // 8)
    painted = square_colour(autoencoder.decode(autoencoder.encode(squares).mode()), side=resolution * 5 // 8,
                            inset=resolution // 8)
    hue_in, _, _, _ = hsv(colours[:, :, None, None])
    hue_out, _, _, chroma_out = hsv(painted[:, :, None, None])
    seconds_file = ckpt.parents[1] / "train_seconds.txt"
    return {
        "ckpt": ckpt,
        "config": config,
        "psnr": float(psnr(x, x_rec).mean()),
        "overall": overall,
        "per_bin": per_bin,
        "square_rgb": painted,
        "square_mae": (painted - colours).abs().mean(1),
        "square_hue_error": hue_distance(hue_in, hue_out).flatten(),
        "square_chroma_ratio": chroma_out.flatten() / (colours.max(1).values - colours.min(1).values),
        "train_seconds": float(seconds_file.read_text()) if seconds_file.is_file() else None,
        "count": len(x),
    }


def hue_shares(shards: list[str], resolution: int = 32) -> None:
    """Share of the coloured pixels of each shard set in each hue bin (how skewed its palette is)."""

    print("\n| training set | emoji | " + " | ".join(CHROMATIC_BINS) + " |")
    print("|---|---|" + "---|" * len(CHROMATIC_BINS))
    for spec in shards:
        counts = torch.zeros(len(HUE_BINS))
        n = 0
        for batch in read_images(spec, resolution).split(256):
            rgb = to_255(batch)
            counts += torch.bincount(hue_bin(rgb)[hsv(rgb)[3] >= CHROMA_MIN], minlength=len(HUE_BINS)).float()
            n += len(batch)
        shares = counts[:len(CHROMATIC_BINS)] / counts[:len(CHROMATIC_BINS)].sum()
        print(f"| {spec} | {n} | " + " | ".join(f"{100 * s:.1f} %" for s in shares.tolist()) + " |")
        name = Path(spec).name
        for bin_name, share in zip(CHROMATIC_BINS, shares.tolist()):
            print(f"RESULT hue_share_{name}_{bin_name.replace('/', '_')}={share:.4f}")


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def spread(values: list[float], digits: int) -> str:
    """"mean (a / b / …)" for several values, the value alone for one."""
    text = f"{mean(values):.{digits}f}"
    return text if len(values) == 1 else f"{text} ({' / '.join(f'{v:.{digits}f}' for v in values)})"


def report(results: list[dict], name: str) -> None:
    prefix = f"{name}_" if name else ""
    n = results[0]["count"]
    print(f"\n{len(results)} checkpoint(s), {n} held-out emoji each:")
    for i, r in enumerate(results):
        seconds = f", trained in {r['train_seconds']:.0f} s" if r["train_seconds"] else ""
        print(f"  [{i}] {r['ckpt']}{seconds}")

    rows = [("PSNR (dB)", [r["psnr"] for r in results], 2),
            ("chroma ratio", [r["overall"].chroma_ratio for r in results], 3),
            ("colour MAE (0-255)", [r["overall"].colour_mae for r in results], 1),
            ("hue error (deg)", [r["overall"].hue_error for r in results], 1),
            ("squares: colour MAE (0-255)", [float(r["square_mae"].mean()) for r in results], 1),
            ("squares: chroma ratio", [float(r["square_chroma_ratio"].mean()) for r in results], 3)]
    print("\n| held-out emoji | mean (each checkpoint) |\n|---|---|")
    for label, values, digits in rows:
        print(f"| {label} | {spread(values, digits)} |")

    # Per hue bin: the pixels of every checkpoint pooled (each checkpoint sees the same inputs).
    print("\n| hue of the input | pixels | chroma in | chroma out | chroma ratio | colour MAE | hue error (deg) |")
    print("|---|---|---|---|---|---|---|")
    for bin_name in HUE_BINS:
        stats = [r["per_bin"][bin_name] for r in results]
        if stats[0].pixels == 0:
            print(f"| {bin_name} | 0 | | | | | |")
            continue
        # Hue and chroma ratio mean nothing for greys (their chroma is about 0).
        chromatic = bin_name in CHROMATIC_BINS
        hue = f"{mean([s.hue_error for s in stats]):.1f}" if chromatic else "–"
        ratio = f"{mean([s.chroma_ratio for s in stats]):.2f}" if chromatic else "–"
        print(f"| {bin_name} | {100 * stats[0].share:.1f} % | {mean([s.chroma_in for s in stats]):.0f} | "
              f"{mean([s.chroma_out for s in stats]):.0f} | {ratio} | {mean([s.colour_mae for s in stats]):.1f} | "
              f"{hue} |")

    print("\n| flat square | input RGB | painted RGB (each checkpoint) | colour MAE | hue error (deg) |")
    print("|---|---|---|---|---|")
    for j, (label, rgb) in enumerate(SQUARES):
        painted = " / ".join("(" + ", ".join(f"{v:.0f}" for v in r["square_rgb"][j].tolist()) + ")" for r in results)
        print(f"| {label} | {rgb} | {painted} | {mean([float(r['square_mae'][j]) for r in results]):.1f} | "
              f"{mean([float(r['square_hue_error'][j]) for r in results]):.0f} |")

    def result(key: str, values: list[float], digits: int = 4) -> None:
        print(f"RESULT {prefix}{key}={mean(values):.{digits}f}")
        if len(values) > 1:
            for i, v in enumerate(values):
                print(f"RESULT {prefix}{key}_seed{i}={v:.{digits}f}")

    print()
    for label, values, _ in rows:
        key = {"PSNR (dB)": "psnr", "chroma ratio": "chroma_ratio", "colour MAE (0-255)": "colour_mae",
               "hue error (deg)": "hue_error", "squares: colour MAE (0-255)": "squares_colour_mae",
               "squares: chroma ratio": "squares_chroma_ratio"}[label]
        result(key, values)
    for bin_name in HUE_BINS:
        key = bin_name.replace("/", "_")
        stats = [r["per_bin"][bin_name] for r in results]
        if stats[0].pixels and bin_name in CHROMATIC_BINS:
            print(f"RESULT {prefix}chroma_ratio_{key}={mean([s.chroma_ratio for s in stats]):.4f}")
            print(f"RESULT {prefix}hue_error_{key}={mean([s.hue_error for s in stats]):.4f}")
        if stats[0].pixels:
            print(f"RESULT {prefix}colour_mae_{key}={mean([s.colour_mae for s in stats]):.4f}")
    seconds = [r["train_seconds"] for r in results if r["train_seconds"]]
    if seconds:
        result("train_seconds", seconds, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, action="append", default=[], help="a stage-1 checkpoint (repeatable)")
    parser.add_argument("--train", type=Path, default=None, help="train into DIR/seed<S> with train.py first")
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1],
                        help="comma-separated seeds to train (with --train), default 0,1")
    parser.add_argument("--experiment", default="emoji_autoencoder", help="experiment to train (with --train)")
    parser.add_argument("--retrain", action="store_true", help="train again even if DIR/seed<S> has a checkpoint")
    parser.add_argument("--holdout", default=None,
                        help="held-out shards (default: the val_shards of the checkpoint's run)")
    parser.add_argument("--name", default="", help="prefix of the RESULT names")
    parser.add_argument("--hues-of", nargs="+", default=[], metavar="SHARDS",
                        help="measure the palette of these training sets (shard folders) instead")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for train.py (with --train)")
    args = parser.parse_args()
    if args.hues_of:
        hue_shares(args.hues_of)
        return
    if not args.ckpt and args.train is None:
        fail("give --ckpt PATH or --train DIR")
    if args.overrides and args.train is None:
        fail(f"overrides {args.overrides} need --train DIR")
    torch.set_grad_enabled(False)

    ckpts = list(args.ckpt)
    if args.train is not None:
        ckpts += [train(args.train, seed, args.experiment, args.overrides, args.retrain) for seed in args.seeds]
    report([measure(c, args.holdout) for c in ckpts], args.name)


if __name__ == "__main__":
    main()
