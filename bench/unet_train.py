"""U-Net training step, ours against diffusers: forward, MSE loss, backward, AdamW step.

    python bench/unet_train.py --config emoji                    # batch 64 of 4×8×8 latents, 77×256 context
    python bench/unet_train.py --config sd1 --batch 1 --latent 32
    python bench/unet_train.py --device cuda --config sd1 --dtype bf16 --backend xformers --compile

Both models share one set of parameters (diffusers' is built from ours, parameter counts asserted equal) and one
torch.optim.AdamW (its defaults, as in diffusers' training scripts and our configs/model/ldm.yaml), and take
turns. Peak memory comes from a fresh process per implementation (bench/common.py, PeakMemory): the peak of a
steady-state step above the memory before the model was built, i.e. weights, gradients, AdamW state and
activations; "activations" is the part above the memory just before the step.

--mask gives the context the padding mask of real captions (token counts of the emoji set's captions): our
U-Net then skips the padded positions (trim_masked_context), diffusers attends over all 77 with a bias.
"""

from __future__ import annotations

import json
import os
import random
import sys
from functools import lru_cache
from pathlib import Path

import torch

from common import (PeakMemory, available_memory_bytes, autocast, base_parser, build_unet, count_parameters,
                    diffusers_unet_sharing, fmt, mib, paired_ratio, print_header, print_table, result, run_child,
                    setup, spread, summary, time_alternately, MEMORY_ENV)
from flops import PEAK_TFLOPS_DEFAULT, train_step_flops

SIZES = {"emoji": dict(batch=64, latent=8), "sd1": dict(batch=1, latent=32), "sd2": dict(batch=1, latent=32)}
CONTEXT_LEN = 77
# fp32 weights, gradients and two AdamW moments
SD_TRAINING_BYTES = 16 * 860e6


@lru_cache(maxsize=None)
def caption_token_counts() -> list[int]:
    """Tokens (with start and end) of each emoji caption under the CLIP tokenizer; a fixed stand-in if the
    emoji packages are missing."""
    try:
        import open_clip

        from ldm.data.build_emoji import named_glyphs

        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        captions = [g.caption for g in named_glyphs()]
        ids = tokenizer(captions)  # (N, 77), zero-padded
        return [int(n) for n in (ids != 0).sum(1)]
    except Exception:  # noqa: BLE001 - any failure: fall back to a plausible spread of short captions
        return [4, 5, 5, 6, 6, 7, 8, 9, 12]


def make_inputs(kwargs, batch, latent, device, mask: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, kwargs.get("in_channels", 4), latent, latent, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    context = torch.randn(batch, CONTEXT_LEN, kwargs["context_dim"], generator=g).to(device)
    target = torch.randn(x.shape, generator=g).to(device)
    context_mask = None
    if mask:
        rng = random.Random(0)
        lengths = [min(rng.choice(caption_token_counts()), CONTEXT_LEN) for _ in range(batch)]
        context_mask = (torch.arange(CONTEXT_LEN)[None] < torch.tensor(lengths)[:, None]).to(device)
    return x, t, context, context_mask, target


def make_step(call, params, target, args, optimizer=None, fused_adamw=False):
    """forward, loss, backward, AdamW step. ``fused_adamw`` switches a shared optimizer to torch's fused kernel
    for this step only (same state tensors), so both kernels can take turns on one set of weights."""
    optimizer = optimizer or torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    def step():
        with autocast(args):
            out = call()
            loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        group = optimizer.param_groups[0]
        saved = group["fused"], group["foreach"]
        if fused_adamw:
            group["fused"], group["foreach"] = True, False
        try:
            optimizer.step()
        finally:
            group["fused"], group["foreach"] = saved
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def ours_call(model, x, t, context, mask):
    return lambda: model(x, t, context, mask)


def theirs_call(model, x, t, context, mask):
    return lambda: model(x, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample


def apply_options(model, args):
    if args.backend:
        model.set_attention_backend(args.backend)
    return model


def memory_child(args) -> None:
    """One implementation, alone in this process: print its peak memory as JSON."""
    # Both children import diffusers' model code before the baseline: the library is not the model.
    from diffusers import UNet2DConditionModel  # noqa: F401
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: F401

    meter = PeakMemory(args.device)
    before_model = meter.baseline()
    ours, kwargs = build_unet(args.config, args.device)
    apply_options(ours, args)
    x, t, context, mask, target = make_inputs(kwargs, args.batch, args.latent, args.device, args.mask)
    if args.memory_child.startswith("ours"):
        model, call = ours, ours_call(ours, x, t, context, mask)
    else:
        model = diffusers_unet_sharing(ours, kwargs)
        del ours
        call = theirs_call(model, x, t, context, mask)
    model.train()
    step, _ = make_step(call, list(model.parameters()), target, args, fused_adamw=args.memory_child == "ours-fused")
    for _ in range(2):  # AdamW state exists after the first step; the second is steady state
        step()
    before_step = meter.baseline()
    meter.reset()
    step()
    peak = meter.peak()
    print(json.dumps({"peak": peak - before_model, "activations": peak - before_step}))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--config", default="emoji", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--latent", type=int, default=None, help="latent side (the U-Net input is 4×N×N)")
    parser.add_argument("--backend", default=None, choices=("sdpa", "math", "xformers"),
                        help="attention backend for ours (diffusers keeps its default, SDPA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (compile time reported)")
    parser.add_argument("--mask", action="store_true", help="padding mask of real caption lengths")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--fused-adamw", action="store_true",
                        help="add a row: ours with torch's fused AdamW (the same optimizer state, taking turns)")
    parser.add_argument("--json", action="store_true", help="end with a JSON line of images/s per implementation")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"for MFU (default {PEAK_TFLOPS_DEFAULT:g} on CUDA, none on the CPU)")
    parser.add_argument("--memory-child", choices=("ours", "diffusers", "ours-fused"), help=argparse_hidden())
    args = parser.parse_args()
    args.batch = args.batch or SIZES[args.config]["batch"]
    args.latent = args.latent or SIZES[args.config]["latent"]
    args.repeats = args.repeats or (3 if args.quick else (5 if args.config != "emoji" else 9))
    setup(args)
    if args.memory_child:
        return memory_child(args)

    label = f"{args.config}_b{args.batch}_l{args.latent}" + ("_mask" if args.mask else "")
    if args.device == "cpu" and args.config != "emoji" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # With glibc's adaptive mmap threshold the freed gradients and AdamW temporaries of an SD-size model stay
        # in the heap and fragment it: this process grew to 20 GB and was killed on a 24 GB machine. A fixed
        # threshold returns large blocks at once and holds it at the 14 GB the tensors need.
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], {**os.environ, **MEMORY_ENV})
    if args.device == "cpu" and args.config != "emoji" and available_memory_bytes() < 1.15 * SD_TRAINING_BYTES:
        print(f"skipped {label}: needs about {SD_TRAINING_BYTES / 2**30:.0f} GiB free for fp32 weights, gradients "
              f"and AdamW state; {available_memory_bytes() / 2**30:.1f} GiB available")
        return

    print_header(f"U-Net training step: {label}, {args.dtype}, {args.device}", args)
    # Peak memory first, each implementation alone in a fresh process while this one holds no model: an SD1
    # U-Net with its gradients and AdamW state takes 14 GB, and two of those do not fit a 24 GB machine.
    memory = {}
    if not args.no_memory:
        child = [a for a in sys.argv[1:] if a != "--no-memory"]
        names = ["ours", "diffusers"] + (["ours + fused AdamW"] if args.fused_adamw else [])
        for name in names:
            env = MEMORY_ENV if args.device == "cpu" else {}
            which = {"ours + fused AdamW": "ours-fused"}.get(name, name)
            memory[name] = run_child(Path(__file__), [*child, "--memory-child", which], env=env)

    ours, kwargs = build_unet(args.config, args.device)
    apply_options(ours, args)
    theirs = diffusers_unet_sharing(ours, kwargs)
    ours.train(), theirs.train()
    x, t, context, mask, target = make_inputs(kwargs, args.batch, args.latent, args.device, args.mask)
    # One optimizer for the shared parameters: each implementation's step updates the same weights.
    calls = {"ours": ours_call(ours, x, t, context, mask), "diffusers": theirs_call(theirs, x, t, context, mask)}
    compile_s = {}
    if args.compile:
        import time

        compiled = {"ours": torch.compile(ours), "diffusers": torch.compile(theirs)}
        calls = {"ours": ours_call(compiled["ours"], x, t, context, mask),
                 "diffusers": theirs_call(compiled["diffusers"], x, t, context, mask)}
    steps = {}
    params = list(ours.parameters())
    optimizer = None
    for name, call in calls.items():
        steps[name], optimizer = make_step(call, params, target, args, optimizer)
    if args.fused_adamw:
        # Our training configs use torch's fused AdamW (model.optimizer.fused, the default): one kernel per
        # parameter instead of about ten passes over weights, gradients and moments. diffusers' training
        # scripts build torch.optim.AdamW with its defaults, which the plain rows use for both.
        steps["ours + fused AdamW"], _ = make_step(calls["ours"], params, target, args, optimizer, fused_adamw=True)
    if args.compile:
        for name, step in steps.items():
            start = time.perf_counter()
            step()  # the first call compiles forward and backward
            compile_s[name] = time.perf_counter() - start
    times = time_alternately(steps, args.repeats, args.warmup, args.device)
    n_params = count_parameters(ours)

    flops = train_step_flops(kwargs, args.latent, args.batch, CONTEXT_LEN)
    peak = args.peak_tflops or (PEAK_TFLOPS_DEFAULT if args.device == "cuda" else None)
    rows = []
    for name in times:
        s = summary(times[name])
        row = [name, f"{n_params:,}", spread(times[name]), fmt(args.batch / s["median"]),
               fmt(flops / s["median"] / 1e12, 3)]
        if peak:
            row.append(f"{flops / s['median'] / (peak * 1e12):.1%}")
        if memory:
            row += [mib(memory[name]["peak"]), mib(memory[name]["activations"])]
        if compile_s:
            row.append(fmt(compile_s[name]))
        rows.append(row)
    headers = ["impl", "params", "step s (median [min–max])", "images/s", "TFLOP/s"]
    headers += ["MFU"] if peak else []
    headers += ["peak MiB", "activations MiB"] if memory else []
    headers += ["compile s"] if compile_s else []
    print(f"batch {args.batch}, latent 4×{args.latent}×{args.latent}, context {CONTEXT_LEN}×{kwargs['context_dim']}"
          f"{' with caption padding mask' if args.mask else ''}, {args.repeats} alternating repeats after "
          f"{args.warmup} warm-up; analytic FLOPs/step {flops / 1e9:,.1f} G (bench/flops.py)")
    print_table(headers, rows)
    ratio = paired_ratio(times["ours"], times["diffusers"])
    print(f"speed ours/diffusers (paired): {ratio['median']:.3f} [{ratio['min']:.3f}–{ratio['max']:.3f}]")
    figures = {
        f"train_{label}_ours_images_per_s": args.batch / summary(times["ours"])["median"],
        f"train_{label}_diffusers_images_per_s": args.batch / summary(times["diffusers"])["median"],
        f"train_{label}_speed_ratio": ratio["median"],
    }
    if memory:
        figures[f"train_{label}_ours_peak_mib"] = memory["ours"]["peak"] / 2**20
        figures[f"train_{label}_diffusers_peak_mib"] = memory["diffusers"]["peak"] / 2**20
        figures[f"train_{label}_memory_ratio"] = memory["ours"]["peak"] / memory["diffusers"]["peak"]
    if "ours + fused AdamW" in times:
        fused = paired_ratio(times["ours + fused AdamW"], times["diffusers"])
        print(f"speed ours with fused AdamW/diffusers (paired): {fused['median']:.3f} "
              f"[{fused['min']:.3f}–{fused['max']:.3f}]")
        figures[f"train_{label}_ours_fused_adamw_images_per_s"] = (
            args.batch / summary(times["ours + fused AdamW"])["median"])
        figures[f"train_{label}_speed_ratio_fused_adamw"] = fused["median"]
    if peak:
        figures[f"train_{label}_ours_mfu"] = flops / summary(times["ours"])["median"] / (peak * 1e12)
    for name, value in figures.items():
        result(name, value)
    if args.json:
        print(json.dumps({name: args.batch / summary(t)["median"] for name, t in times.items()}))


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
