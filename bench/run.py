"""Run every benchmark and collect the RESULT lines.

    python bench/run.py --quick                  # a few minutes on a 2-core CPU
    python bench/run.py                          # full size (SD1 included: about 16 GB free RAM and an hour)
    python bench/run.py --threads 1 --out bench/results-1t.txt
    python bench/run.py --device cuda --dtype bf16

Each script runs in its own process, one after the other (two at once would share the cores and time each
other's load). Their tables go to stdout and, with --out, to a file; the RESULT lines of all of them are
repeated at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plan(quick: bool, device: str) -> list[list[str]]:
    """(script, arguments) in order. Quick: the emoji sizes and SD's VAE; full: SD1 as well."""
    runs = [
        ["flops.py"],
        ["unet_train.py", "--config", "emoji", "--fused-adamw"],
        ["unet_train.py", "--config", "emoji", "--mask", "--fused-adamw"],
        ["unet_sample.py", "--config", "emoji", "--channels-last"],
        ["unet_sample.py", "--config", "emoji", "--mask", "--channels-last"],
        ["vae.py", "--config", "emoji"],
        ["vae.py", "--config", "kl-f8"],
        ["attention_scaling.py"],
        ["ablation.py"],
    ]
    if device == "cpu":
        runs.append(["data_pipeline.py"])
    else:
        # The GPU path: SD1 at SD's 64×64 latents, each attention backend of ours, then torch.compile.
        sd1 = ["unet_train.py", "--config", "sd1", "--batch", "8", "--latent", "64", "--fused-adamw"]
        runs += [sd1 + ["--backend", b] for b in ("xformers", "sdpa", "math")] + [sd1 + ["--compile"]]
        runs.append(["unet_sample.py", "--config", "sd1", "--batch", "4", "--latent", "64"])
    if not quick:
        runs += [
            ["unet_train.py", "--config", "sd1", "--batch", "1", "--latent", "32", "--fused-adamw"],
            ["unet_sample.py", "--config", "sd1", "--batch", "1", "--latent", "32", "--repeats", "2"],
            ["ablation.py", "--compile", "--allocator"],
        ]
        runs = [r for r in runs if r != ["ablation.py"]]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--only", nargs="*", default=None, help="run only these scripts (e.g. vae.py)")
    parser.add_argument("--out", type=Path, default=None, help="also write everything printed to this file")
    args = parser.parse_args()

    common = ["--quick"] if args.quick else []
    common += ["--threads", str(args.threads)] if args.threads else []
    common += ["--device", args.device, "--dtype", args.dtype]
    results, log = [], []
    failures = 0
    for script, *extra in plan(args.quick, args.device):
        if args.only and script not in args.only:
            continue
        cmd = [sys.executable, str(HERE / script), *extra, *([] if script == "flops.py" else common)]
        line = "$ python bench/" + " ".join([script, *cmd[2:]])
        print(line, flush=True)
        log.append(line)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
        out = proc.stdout + (f"\n[failed with exit code {proc.returncode}]\n{proc.stderr[-2000:]}"
                             if proc.returncode else "")
        failures += proc.returncode != 0
        print(out, flush=True)
        print(f"({time.perf_counter() - start:.0f} s)\n", flush=True)
        log += [out, f"({time.perf_counter() - start:.0f} s)\n"]
        results += [r for r in proc.stdout.splitlines() if r.startswith("RESULT ")]
    print("\n".join(results))
    if args.out:
        args.out.write_text("\n".join(log + results) + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
