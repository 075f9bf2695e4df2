"""What every benchmark shares: the reference models, fair timing, peak memory, tables and RESULT lines.

Fairness rules, applied by every script:

- ours and diffusers run the same architecture (diffusers' model is built from ours with the same weights,
  and the parameter counts are asserted equal), the same batch, resolution, dtype and thread count;
- they are timed alternately in one process after warm-up, so both see the same machine load; the figure is
  the median of the repeats, the ratio the median of the per-repeat ratios (each pair ran back to back);
- peak memory is measured in a fresh process per model (see ``measure_peak_memory``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from ldm.convert.to_diffusers import diffusers_vae_from_ours, unet_config, vae_config  # noqa: E402
from ldm.presets import unet_preset  # noqa: E402

# The shapes of configs/model/unet/*.yaml (ldm/presets).
UNET_CONFIGS: dict[str, dict[str, Any]] = {name: unet_preset(name) for name in ("emoji", "sd1", "sd2")}
# The emoji experiment's autoencoder and SD's KL-f8 (configs/experiment/emoji_autoencoder.yaml, model/autoencoder.yaml).
VAE_CONFIGS: dict[str, dict[str, Any]] = {
    # 32 groups at every width, as diffusers' VAE normalises: the same architecture on both sides (the emoji
    # experiment itself trains without norm layers, which diffusers' VAE cannot express).
    "emoji": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, norm_group_channels=1),
    "kl-f8": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4),
}
# Stable Diffusion's sampling schedule, in diffusers' words.
SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")


# ------------------------------------------------------------------------------------------------ arguments


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (minutes on 2 CPU cores)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both implementations (default: torch's default, the core count)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per implementation first")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="fp32, or autocast to bf16/fp16 with fp32 weights")
    return parser


def setup(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    torch.manual_seed(0)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(args: argparse.Namespace):
    """Mixed precision as training runs it: fp32 weights, autocast to the low-precision dtype."""
    if args.dtype == "fp32":
        return torch.autocast(args.device, enabled=False)
    return torch.autocast(args.device, dtype=DTYPES[args.dtype])


def environment(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """The machine and the load it was under, printed above every table."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if args is not None and args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    malloc = ",".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    if malloc:
        env["malloc"] = malloc
    return env


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on the CPU (AVX512-BF16 or AMX); without it bf16 autocast is emulated, and slow."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ------------------------------------------------------------------------------------------------ models


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_unet(name: str, device: str = "cpu", **overrides: Any):
    from ldm.modules.unet import UNetModel

    kwargs = {**UNET_CONFIGS[name], **overrides}
    torch.manual_seed(0)
    with torch.device(device):
        model = UNetModel(**kwargs)
    # Non-zero weights everywhere: zero-initialised output layers would let some paths skip real work.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    return model, kwargs


def diffusers_unet_sharing(ours: torch.nn.Module, unet_kwargs: dict[str, Any]):
    """diffusers' UNet2DConditionModel at our architecture whose parameters *are* ours (the same objects).

    The same key conversion as ldm.convert.to_diffusers (diffusers' own single-file converter), but the
    converted entries are assigned instead of copied: an SD1 U-Net and its AdamW state take 14 GB in fp32,
    and two copies would not fit next to each other on a 24 GB machine. Sharing also keeps the weights
    identical while both are trained alternately by one optimizer.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        theirs = UNet2DConditionModel(**unet_config(unet_kwargs))
    params = {"model.diffusion_model." + k: v for k, v in ours.named_parameters()}
    buffers = {"model.diffusion_model." + k: v for k, v in ours.named_buffers()}
    converted = convert_ldm_unet_checkpoint({**params, **buffers}, theirs.config)
    theirs.load_state_dict(converted, strict=True, assign=True)
    ours_n, theirs_n = count_parameters(ours), count_parameters(theirs)
    assert ours_n == theirs_n, f"parameter counts differ: ours {ours_n:,} vs diffusers {theirs_n:,}"
    shared = {id(p) for p in ours.parameters()}
    assert all(id(p) in shared for p in theirs.parameters()), "diffusers' U-Net does not share our parameters"
    return theirs


def build_vae(name: str, device: str = "cpu"):
    from ldm.modules.autoencoder import AutoencoderKL

    kwargs = VAE_CONFIGS[name]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoencoderKL(**kwargs)
    return model.eval(), kwargs


def diffusers_vae(ours: torch.nn.Module, vae_kwargs: dict[str, Any]):
    theirs = diffusers_vae_from_ours(ours, vae_kwargs).to(next(ours.parameters()).device)
    ours_n, theirs_n = count_parameters(ours), count_parameters(theirs)
    assert ours_n == theirs_n, f"parameter counts differ: ours {ours_n:,} vs diffusers {theirs_n:,}"
    assert vae_config(vae_kwargs)["block_out_channels"][0] == vae_kwargs["ch"]
    return theirs


# ------------------------------------------------------------------------------------------------ timing


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_alternately(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2, device: str = "cpu"
) -> dict[str, list[float]]:
    """Wall-clock seconds of each call, the implementations taking turns (a, b, a, b, ...) after warm-up."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def summary(seconds: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def paired_ratio(ours: Sequence[float], theirs: Sequence[float]) -> dict[str, float]:
    """Median and range of theirs_i / ours_i over the back-to-back pairs: > 1 means ours is faster.

    Each pair ran within seconds of each other, so load that drifts over the run cancels in the ratio."""
    ratios = [t / o for o, t in zip(ours, theirs)]
    return summary(ratios)


# ------------------------------------------------------------------------------------------------ memory


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# glibc serves large blocks with mmap and unmaps them on free, but raises that threshold on the fly as memory
# is freed, after which freed blocks stay in the heap and in the RSS. A fixed threshold turns the dynamic
# rule off, so the RSS follows the bytes actually in use.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


class PeakMemory:
    """Peak memory of a region, in bytes above a baseline: CUDA's allocator statistics on a GPU; on the CPU the
    resident set's high-water mark, which the kernel keeps (VmHWM) and lets a process reset (clear_refs)."""

    def __init__(self, device: str):
        self.device = device

    def baseline(self) -> int:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return rss_bytes()

    def reset(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()

    def peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return peak_rss_bytes()


def run_child(script: Path, args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 3600) -> dict:
    """Run a benchmark script in a fresh process and return the JSON it prints on its last line."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------------------------ output


def fmt(value: float, digits: int = 3) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def print_header(title: str, args: argparse.Namespace) -> None:
    env = environment(args)
    print(f"## {title}")
    print("  ".join(f"{k}={v}" for k, v in env.items()))
    print()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table, pasteable into BENCHMARKS.md."""
    cells = [[str(c) for c in row] for row in rows]
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in cells:
        print("| " + " | ".join(row) + " |")
    print()


def result(name: str, value: float) -> None:
    """The machine-readable line each figure ends with."""
    print(f"RESULT {name}={value:.6g}", flush=True)


def spread(seconds: Sequence[float]) -> str:
    s = summary(seconds)
    return f"{fmt(s['median'])} [{fmt(s['min'])}–{fmt(s['max'])}]"


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"
