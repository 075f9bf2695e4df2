"""Peak memory of one U-Net training step with and without gradient checkpointing (model.unet.gradient_checkpointing).

    python scripts/measure_memory.py                      # the emoji U-Net, batch 32 of 16×16 latents, CPU
    python scripts/measure_memory.py --unet sd1 --batch 4 --latent 64 --device cuda

Each variant runs in a fresh process. On CUDA the figure is torch.cuda.max_memory_allocated() during the step
minus what was allocated before it; on the CPU, the largest resident set of the process during the step
(sampled every millisecond) minus its size before. A fixed glibc mmap threshold makes every large tensor an
mmap returned to the system when freed, so the resident set follows the live tensors. The first step
(which allocates gradients and optimizer state) is not measured. Prints one RESULT line per variant and
one for the saving.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

PAGE = os.sysconf("SC_PAGE_SIZE")

UNETS = {
    # the built-in emoji model's U-Net (configs/model/unet/emoji.yaml)
    "emoji": dict(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2), num_heads=4,
                  context_dim=256),
    # Stable Diffusion 1.x (configs/model/unet/sd1.yaml): a GPU-sized measurement
    "sd1": dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_resolutions=(4, 2, 1),
                num_heads=8, context_dim=768),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class PeakRSS:
    """The largest resident set seen while the block runs, sampled every millisecond by a thread (torch
    releases the GIL in its kernels, so the sampler runs during them)."""

    def __enter__(self) -> "PeakRSS":
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def measure(unet: str, batch: int, latent: int, tokens: int, device: str, checkpointing: bool, steps: int) -> dict:
    import torch

    from ldm.modules.unet import UNetModel

    torch.manual_seed(0)
    model = UNetModel(**UNETS[unet], gradient_checkpointing=checkpointing).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 4, latent, latent, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    context = torch.randn(batch, tokens, UNETS[unet]["context_dim"], device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x, t, context).float().pow(2).mean().backward()
        optimizer.step()

    step()  # the first step allocates gradients and optimizer state: measure a later one
    optimizer.zero_grad(set_to_none=True)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mb()
    start = time.perf_counter()
    with PeakRSS() as rss:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else rss.peak) - before
    return {"peak_mb": round(peak, 1), "step_s": round((time.perf_counter() - start) / steps, 3),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", choices=tuple(UNETS), default="emoji")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--latent", type=int, default=16, help="latent side (image side / autoencoder factor)")
    parser.add_argument("--tokens", type=int, default=77, help="context length")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = measure(args.unet, args.batch, args.latent, args.tokens, args.device, args.child == "on", args.steps)
        print(json.dumps(result))
        return
    results = {}
    for flag in ("off", "on"):
        # A fixed mmap threshold: glibc then serves every large tensor with mmap and returns it when freed,
        # instead of raising the threshold and keeping freed tensors in its heap (which hides them from RSS).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--child", flag],
                              capture_output=True, text=True, check=True, env=env)
        results[flag] = json.loads(proc.stdout.strip().splitlines()[-1])
    where = (f"unet={args.unet} params_m={results['off']['params_m']} batch={args.batch} "
             f"latent={args.latent}x{args.latent} tokens={args.tokens} device={args.device}")
    for flag in ("off", "on"):
        r = results[flag]
        print(f"RESULT peak_step_memory_mb gradient_checkpointing={flag} {where} value={r['peak_mb']} "
              f"step_s={r['step_s']}")
    off, on = results["off"]["peak_mb"], results["on"]["peak_mb"]
    print(f"RESULT gradient_checkpointing_saving {where} saved_mb={off - on:.1f} ratio={on / off:.3f} "
          f"slowdown={results['on']['step_s'] / results['off']['step_s']:.2f}x")


if __name__ == "__main__":
    main()
