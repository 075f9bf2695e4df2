"""What each optimisation of the U-Net hot path gives: every variant timed alternately with the default.

    python bench/ablation.py                 # emoji U-Net: training step and 50-step guided DDIM
    python bench/ablation.py --compile       # adds torch.compile (compile time against per-step gain)
    python bench/ablation.py --allocator     # adds glibc malloc settings (separate processes)

All variants share the default's weights. "previous" is the hot path before these changes (separate q/k/v
projections, the context's padding attended, autograd's GEGLU and strided tokens in the transformer, no
cached context), rebuilt here from the same modules. Inputs carry the caption padding mask, as the text
conditioner produces (bench/unet_train.py --mask); the trimming rows show what the mask is worth.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (MEMORY_ENV, PeakMemory, autocast, base_parser, build_unet, cpu_has_bf16, fmt, mib,
                    print_header, print_table, result, run_child, setup, summary, time_alternately)
from unet_sample import channels_last_copy, ours_sampler
from unet_sample import inputs as sample_inputs
from unet_train import make_inputs

BATCH, LATENT, SAMPLE_BATCH = 64, 8, 16


# -- the previous hot path, for the "off" variants -------------------------------------------------------------


def _plain_geglu(self, x):
    h, gate = self.proj(x).chunk(2, dim=-1)
    return h * F.gelu(gate)  # autograd keeps gelu(gate) for backward


def _strided_tokens(self, x, context, mask=None):
    b, c, h, w = x.shape
    residual = x
    x = self.norm(x)
    if not self.use_linear:
        x = self.proj_in(x)
    x = x.flatten(2).transpose(1, 2)  # a transposed view: each LayerNorm and residual add re-reads it strided
    if self.use_linear:
        x = self.proj_in(x)
    for block in self.transformer_blocks:
        x = block(x, context, mask)
    if self.use_linear:
        x = self.proj_out(x)
    x = x.transpose(1, 2).reshape(b, -1, h, w)
    if not self.use_linear:
        x = self.proj_out(x)
    return x + residual


def variant(base, fuse=True, trim=True, geglu=True, tokens=True, backend=None):
    from ldm.modules.transformer import GEGLU, SpatialTransformer

    model = copy.deepcopy(base)
    model.trim_masked_context = trim
    for layer in model.attention_layers():
        layer.fuse_projections = fuse
        if backend:
            layer.backend = backend
    for module in model.modules():
        if isinstance(module, GEGLU) and not geglu:
            module.forward = types.MethodType(_plain_geglu, module)
        if isinstance(module, SpatialTransformer) and not tokens:
            module.forward = types.MethodType(_strided_tokens, module)
    return model


PREVIOUS = dict(fuse=False, trim=False, geglu=False, tokens=False)


# -- training -------------------------------------------------------------------------------------------------


def train_step(model, ins, args, channels_last=False, fused_adamw=False, dtype=None, sdpa_math=False,
               flush_denormal=False, mkldnn=True):
    x, t, context, mask, target = ins
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=fused_adamw or None)
    cast = torch.autocast("cpu", dtype=dtype) if dtype else autocast(args)

    def step():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernels = [SDPBackend.MATH] if sdpa_math else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
        # Global torch.backends flags, set for this variant's step only (the variants take turns).
        torch.set_flush_denormal(flush_denormal)
        try:
            with torch.backends.mkldnn.flags(enabled=mkldnn):
                with cast, sdpa_kernel(kernels):
                    loss = F.mse_loss(model(x, t, context, mask).float(), target)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            torch.set_flush_denormal(False)

    return step


def training_specs(quick: bool) -> dict[str, tuple[dict, dict, bool]]:
    """variant name → (model options, step options, with the caption padding mask)."""
    specs = {
        "default": (dict(), dict(), True),
        "previous hot path": (PREVIOUS, dict(), True),
        "no fused q/k/v": (dict(fuse=False), dict(), True),
        "no padding trim": (dict(trim=False), dict(), True),
        "autograd GEGLU": (dict(geglu=False), dict(), True),
        "strided tokens": (dict(tokens=False), dict(), True),
        "attention: math backend": (dict(backend="math"), dict(), True),
        "sdpa: torch math kernel": (dict(), dict(sdpa_math=True), True),
        "+ channels_last input": (dict(), dict(channels_last=True), True),
        "+ fused AdamW": (dict(), dict(fused_adamw=True), True),
        "+ bf16 autocast": (dict(), dict(dtype=torch.bfloat16), True),
        "+ flush denormals": (dict(), dict(flush_denormal=True), True),
        "torch.backends.mkldnn off": (dict(), dict(mkldnn=False), True),
        "default, no mask": (dict(), dict(), False),
        "previous, no mask": (PREVIOUS, dict(), False),
    }
    if quick:
        for name in ("attention: math backend", "sdpa: torch math kernel", "strided tokens", "+ bf16 autocast",
                     "+ flush denormals", "torch.backends.mkldnn off"):
            specs.pop(name)
    return specs


# Variants whose activation memory is measured too (each in a fresh process).
MEMORY_VARIANTS = ("default", "previous hot path", "autograd GEGLU", "no padding trim", "default, no mask",
                   "previous, no mask")


def training_step_for(name, base, args):
    model_opts, step_opts, masked = training_specs(False)[name]
    ins = make_inputs(base.kwargs, BATCH, LATENT, "cpu", mask=masked)
    return train_step(variant(base, **model_opts).train(), ins, args, **step_opts)


def training_ablation(args, base):
    steps = {name: training_step_for(name, base, args) for name in training_specs(args.quick)}
    times = time_alternately(steps, args.repeats, args.warmup)
    memory = {}
    extra = ["--threads", str(args.threads)] if args.threads else []
    for name in MEMORY_VARIANTS:
        memory[name] = run_child(Path(__file__), ["--memory-child", name, *extra], env=MEMORY_ENV)
    bf16_note = None if cpu_has_bf16() else "this CPU has no AVX512-BF16/AMX: bf16 is emulated"
    return times, memory, bf16_note


def memory_child(args) -> None:
    meter = PeakMemory("cpu")
    base, kwargs = build_unet("emoji")
    base.kwargs = kwargs
    step = training_step_for(args.memory_child, base, args)
    for _ in range(2):
        step()
    before = meter.baseline()
    meter.reset()
    step()
    print(json.dumps({"activations": meter.peak() - before}))


# -- sampling -------------------------------------------------------------------------------------------------


def sampling_ablation(args, base):
    ins = sample_inputs(base.kwargs, SAMPLE_BATCH, LATENT, "cpu", mask=True)
    specs = {
        "default": dict(),
        "no fused q/k/v": dict(fuse=False),
        "no padding trim": dict(trim=False),
    }
    runs = {name: ours_sampler(variant(base, **opts).eval(), *ins, 50, args) for name, opts in specs.items()}
    plain = variant(base).eval()
    runs["no cached context"] = _without_cache(plain, ours_sampler(plain, *ins, 50, args))
    bare = variant(base, trim=False).eval()
    bare_run = ours_sampler(bare, *ins, 50, args)
    previous = variant(base, **PREVIOUS).eval()
    previous_run = ours_sampler(previous, *ins, 50, args)
    runs["no cache, no trim"] = _without_cache(bare, bare_run)
    runs["previous hot path"] = _without_cache(previous, previous_run)
    if not args.quick:
        # Weights and latents in channels_last (NHWC) memory, as sample.py runs it: oneDNN's convolutions then
        # skip their layout reorders.
        nhwc, nhwc_ins = channels_last_copy(variant(base).eval(), ins)
        runs["+ channels_last weights and latents"] = ours_sampler(nhwc, *nhwc_ins, 50, args)
    return time_alternately(runs, max(2, args.repeats - 2), 1)


def _without_cache(model, run):
    """The same loop with cache_context() doing nothing: the text's keys and values recomputed every step."""

    def call():
        original = model.cache_context
        model.cache_context = lambda: _null()
        try:
            return run()
        finally:
            model.cache_context = original

    return call


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- compile and allocator ------------------------------------------------------------------------------------


def compile_ablation(args, base):
    """torch.compile of the whole U-Net: first-step (compile) time, then the per-step gain."""
    ins = make_inputs(base.kwargs, BATCH, LATENT, "cpu", mask=True)
    eager = variant(base).train()
    compiled_model = variant(base).train()
    compiled = torch.compile(compiled_model)
    x, t, context, mask, target = ins
    compiled_ins = (x, t, context, mask, target)

    def wrap(model, data):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

        def step():
            F.mse_loss(model(data[0], data[1], data[2], data[3]), data[4]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    steps = {"eager": wrap(eager, ins), "torch.compile": wrap(compiled, compiled_ins)}
    start = time.perf_counter()
    steps["torch.compile"]()
    compile_s = time.perf_counter() - start
    times = time_alternately(steps, args.repeats, 1)
    return times, compile_s


ALLOCATORS = {
    "glibc default": {},
    # Keep freed memory for reuse instead of returning it: no page faults on the next allocation of that size.
    "glibc: no mmap, no trim": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40),
                                "MALLOC_TOP_PAD_": str(2**28)},
}


def allocator_ablation(args):
    """The emoji training step (ours and diffusers) under each malloc setting, alternating processes."""
    script = Path(__file__).with_name("unet_train.py")
    figures = {name: {"ours": [], "diffusers": []} for name in ALLOCATORS}
    extra = ["--threads", str(args.threads)] if args.threads else []
    for _ in range(2):
        for name, env in ALLOCATORS.items():
            out = run_child(script, ["--config", "emoji", "--no-memory", "--repeats", "3", "--json", *extra], env=env)
            for impl in ("ours", "diffusers"):
                figures[name][impl].append(out[impl])
    return {name: {impl: statistics.median(v) for impl, v in d.items()} for name, d in figures.items()}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compilation)")
    parser.add_argument("--allocator", action="store_true", help="also glibc malloc settings (child processes)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 5)
    setup(args)
    if args.memory_child:
        return memory_child(args)
    print_header("Ablation: emoji U-Net, one optimisation at a time", args)
    base, kwargs = build_unet("emoji")
    base.kwargs = kwargs

    figures = {}
    times, memory, bf16_note = training_ablation(args, base)
    reference = summary(times["default"])["median"]
    rows = []
    for name, seconds in times.items():
        s = summary(seconds)
        ref = summary(times["default" if "no mask" not in name else "default, no mask"])["median"]
        act = mib(memory[name]["activations"]) if name in memory else ""
        rows.append([name, fmt(s["median"]), f"{fmt(s['min'])}–{fmt(s['max'])}", fmt(BATCH / s["median"]),
                     f"{ref / s['median']:.3f}", act])
        figures[f"ablation_train_{_slug(name)}_images_per_s"] = BATCH / s["median"]
        if name in memory:
            figures[f"ablation_train_{_slug(name)}_activations_mib"] = memory[name]["activations"] / 2**20
    print(f"Training step, batch {BATCH}, 4×{LATENT}×{LATENT}, caption padding mask unless 'no mask'; "
          f"{args.repeats} alternating repeats. speed = default's time / this variant's time "
          f"(for the no-mask rows: 'default, no mask' / this)")
    print_table(["variant", "step s", "min–max", "images/s", "speed vs default", "activations MiB"], rows)
    if bf16_note:
        print(f"bf16: {bf16_note}\n")

    sampling = sampling_ablation(args, base)
    ref = summary(sampling["default"])["median"]
    rows = []
    for name, seconds in sampling.items():
        s = summary(seconds)
        rows.append([name, fmt(s["median"]), f"{fmt(s['min'])}–{fmt(s['max'])}", fmt(SAMPLE_BATCH / s["median"]),
                     f"{ref / s['median']:.3f}"])
        figures[f"ablation_sample_{_slug(name)}_images_per_s"] = SAMPLE_BATCH / s["median"]
    print(f"50-step DDIM with guidance 7.5, {SAMPLE_BATCH} images, padding masks; speed = default's time / this")
    print_table(["variant", "loop s", "min–max", "images/s", "speed vs default"], rows)

    if args.compile:
        times, compile_s = compile_ablation(args, base)
        eager, compiled = summary(times["eager"])["median"], summary(times["torch.compile"])["median"]
        gain = eager - compiled
        breakeven = compile_s / gain if gain > 0 else float("inf")
        print_table(["variant", "step s", "images/s", "first step (compile) s"],
                    [["eager", fmt(eager), fmt(BATCH / eager), ""],
                     ["torch.compile", fmt(compiled), fmt(BATCH / compiled), fmt(compile_s)]])
        print(f"torch.compile pays off after {fmt(breakeven)} steps" if gain > 0 else "torch.compile is not faster")
        figures.update(ablation_compile_s=compile_s, ablation_compile_speed=eager / compiled,
                       ablation_compile_breakeven_steps=breakeven)

    if args.allocator:
        allocs = allocator_ablation(args)
        base_ours = allocs["glibc default"]["ours"]
        rows = [[name, fmt(v["ours"]), fmt(v["diffusers"]), f"{v['ours'] / base_ours:.3f}"] for name, v in allocs.items()]
        print("Emoji training step in fresh processes per allocator setting (2 alternating processes each)")
        print_table(["malloc", "ours images/s", "diffusers images/s", "ours vs default malloc"], rows)
        for name, v in allocs.items():
            figures[f"ablation_malloc_{_slug(name)}_ours_images_per_s"] = v["ours"]

    for name, value in figures.items():
        result(name, value)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


if __name__ == "__main__":
    main()
