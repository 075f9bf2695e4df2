"""VAE encode and decode, ours against diffusers' AutoencoderKL at the same configuration and weights.

    python bench/vae.py --config emoji            # ch 32, ch_mult [1,2,2], 1 res block: 32×32 images, batch 64
    python bench/vae.py --config kl-f8            # SD's KL-f8: 256×256, batch 1

Encode is image → posterior mean (``encode(x).mode()`` / ``latent_dist.mode()``); decode is latent → image.
Inference only (no autograd); outputs are compared before timing.
"""

from __future__ import annotations

import torch

from common import (autocast, base_parser, build_vae, count_parameters, diffusers_vae, fmt, paired_ratio,
                    print_header, print_table, result, setup, spread, summary, time_alternately)

SIZES = {"emoji": dict(batch=64, image=32), "kl-f8": dict(batch=1, image=256)}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--config", default="emoji", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--image", type=int, default=None, help="image side in pixels")
    args = parser.parse_args()
    args.batch = args.batch or SIZES[args.config]["batch"]
    args.image = args.image or SIZES[args.config]["image"]
    args.repeats = args.repeats or (3 if args.quick else 7)
    setup(args)
    label = f"{args.config}_b{args.batch}_{args.image}px"
    print_header(f"VAE encode / decode: {label}, {args.dtype}, {args.device}", args)

    ours, kwargs = build_vae(args.config, args.device)
    theirs = diffusers_vae(ours, kwargs)
    f = 2 ** (len(kwargs["ch_mult"]) - 1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.image, args.image, generator=g).mul(2).sub(1).to(args.device)
    z = torch.randn(args.batch, kwargs["z_channels"], args.image // f, args.image // f, generator=g).to(args.device)

    def call(fn):
        def run():
            with torch.no_grad(), autocast(args):
                return fn()
        return run

    work = {
        "encode": {"ours": call(lambda: ours.encode(x).mode()),
                   "diffusers": call(lambda: theirs.encode(x).latent_dist.mode())},
        "decode": {"ours": call(lambda: ours.decode(z)), "diffusers": call(lambda: theirs.decode(z).sample)},
    }
    rows, figures = [], {}
    for what, runs in work.items():
        a, b = runs["ours"]().float(), runs["diffusers"]().float()
        diff = (a - b).abs().max().item()
        if args.dtype == "fp32" and diff > 1e-3:
            raise SystemExit(f"{what}: ours and diffusers disagree (max |Δ| = {diff:.2e})")
        times = time_alternately(runs, args.repeats, args.warmup, args.device)
        ratio = paired_ratio(times["ours"], times["diffusers"])
        for name in runs:
            s = summary(times[name])
            rows.append([what, name, f"{count_parameters(ours):,}", spread(times[name]), fmt(args.batch / s["median"]),
                         f"{ratio['median']:.3f}" if name == "ours" else "", f"{diff:.1e}" if name == "ours" else ""])
            figures[f"vae_{label}_{what}_{name}_images_per_s"] = args.batch / s["median"]
        figures[f"vae_{label}_{what}_speed_ratio"] = ratio["median"]
    print(f"batch {args.batch} at {args.image}×{args.image} (latents 4×{args.image // f}×{args.image // f}), "
          f"{args.repeats} alternating repeats")
    print_table(["pass", "impl", "params", "s (median [min–max])", "images/s", "speed ours/diffusers", "max |Δ|"],
                rows)
    for name, value in figures.items():
        result(name, value)


if __name__ == "__main__":
    main()
