"""Training-step time and peak memory against latent size, for each attention backend.

    python bench/attention_scaling.py                 # latents 16, 32, 64: 256, 1,024, 4,096 tokens per image
    python bench/attention_scaling.py --device cuda   # adds xformers when installed

The emoji U-Net's shape (attention at full and half resolution), batch 1. The backends time alternately in one
process on one model (ldm.modules.attention: sdpa is torch's scaled_dot_product_attention, math the reference
that materialises the (heads, L, L) probabilities); peak memory comes from a fresh process per point.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from common import (MEMORY_ENV, PeakMemory, base_parser, build_unet, fmt, mib, print_header, print_table, result,
                    run_child, setup, spread, summary, time_alternately)
from unet_train import make_inputs, make_step, ours_call


def backends(device: str) -> list[str]:
    from ldm.modules.attention import xformers_available

    names = ["sdpa", "math"]
    if device == "cuda" and xformers_available():
        names.insert(0, "xformers")
    return names


def step_for(model, backend: str, inputs, args):
    x, t, context, mask, target = inputs
    call = ours_call(model, x, t, context, mask)

    def with_backend():
        model.set_attention_backend(backend)
        return call()

    step, _ = make_step(with_backend, list(model.parameters()), target, args)
    return step


def memory_child(args) -> None:
    meter = PeakMemory(args.device)
    before_model = meter.baseline()
    model, kwargs = build_unet("emoji", args.device)
    model.train()
    step = step_for(model, args.memory_child, make_inputs(kwargs, args.batch, args.child_latent, args.device, False),
                    args)
    for _ in range(2):
        step()
    before_step = meter.baseline()
    meter.reset()
    step()
    peak = meter.peak()
    print(json.dumps({"peak": peak - before_model, "activations": peak - before_step}))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latents", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-child", help=__import__("argparse").SUPPRESS)
    parser.add_argument("--child-latent", type=int, help=__import__("argparse").SUPPRESS)
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.quick:
        args.warmup = 1
    setup(args)
    if args.memory_child:
        return memory_child(args)
    print_header(f"Attention backends against resolution: emoji U-Net, batch {args.batch}, {args.dtype}, {args.device}",
                 args)
    model, kwargs = build_unet("emoji", args.device)
    model.train()
    names = backends(args.device)
    rows, figures = [], {}
    for latent in args.latents:
        inputs = make_inputs(kwargs, args.batch, latent, args.device, False)
        steps = {name: step_for(model, name, inputs, args) for name in names}
        times = time_alternately(steps, args.repeats, args.warmup, args.device)
        for name in names:
            memory = None
            if not args.no_memory:
                child = [a for a in sys.argv[1:] if a != "--no-memory"]
                memory = run_child(Path(__file__), [*child, "--memory-child", name, "--child-latent", str(latent)],
                                   env=MEMORY_ENV if args.device == "cpu" else {})
            s = summary(times[name])
            row = [f"{latent}×{latent}", f"{latent * latent:,}", name, spread(times[name]),
                   fmt(args.batch / s["median"])]
            if memory:
                row += [mib(memory["peak"]), mib(memory["activations"])]
                figures[f"scaling_l{latent}_{name}_peak_mib"] = memory["peak"] / 2**20
            rows.append(row)
            figures[f"scaling_l{latent}_{name}_step_s"] = s["median"]
    headers = ["latent", "tokens/layer", "backend", "step s (median [min–max])", "images/s"]
    headers += [] if args.no_memory else ["peak MiB", "activations MiB"]
    print(f"{args.repeats} alternating repeats after {args.warmup} warm-up; training step = forward, backward, AdamW")
    print_table(headers, rows)
    for name, value in figures.items():
        result(name, value)


if __name__ == "__main__":
    main()
