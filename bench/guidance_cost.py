"""Sampling cost of the attention hook and of classifier-free guidance.

    python bench/guidance_cost.py --ckpt runs/quickstart/ldm/checkpoints/last.ckpt [--repeats 5]

1. Capture overhead: every Attention layer checks `self.controller` (None when nothing records or edits
   attention). Sampling is timed with the real layers and with a copy of their forward that has no such check,
   alternately, and the median ratio is reported. The target is ≤ 2 %.
2. Guidance: `cfg_scale=1` runs only the conditional half of the batch. Sampling is timed at cfg_scale 7.5
   and 1, alternately.
Ends with `RESULT name=value` lines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.modules.attention import attention  # noqa: E402
from ldm.modules.transformer import Attention  # noqa: E402
from ldm.pipeline import LatentDiffusionPipeline  # noqa: E402


def forward_without_hook(self, x, context=None, mask=None):
    """Attention.forward minus the controller check: the baseline the hook is measured against."""
    source = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
    return self.to_out(attention(q, k, v, self.heads, mask=mask, backend=self.backend))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = LatentDiffusionPipeline.from_checkpoint(args.ckpt)
    prompts = ["owl"] * args.batch

    def sample(cfg_scale: float = 7.5):
        pipe.generate(prompts, steps=args.steps, cfg_scale=cfg_scale, seed=0, batch_size=args.batch)

    sample()  # warm-up
    with_hook, without_hook, cfg1, cfg75 = [], [], [], []
    real_forward = Attention.forward
    for _ in range(args.repeats):
        with_hook.append(timed(sample))
        Attention.forward = forward_without_hook
        try:
            without_hook.append(timed(sample))
        finally:
            Attention.forward = real_forward
        cfg1.append(timed(lambda: sample(1.0)))
        cfg75.append(timed(lambda: sample(7.5)))

    med = statistics.median
    overhead = (med(with_hook) / med(without_hook) - 1) * 100
    saving = (1 - med(cfg1) / med(cfg75)) * 100
    print(f"{'variant':34s} {'median s':>9s} {'min s':>7s} {'max s':>7s}")
    for name, xs in [("hook present, capture off", with_hook), ("no hook (baseline)", without_hook),
                     ("cfg_scale=7.5", cfg75), ("cfg_scale=1", cfg1)]:
        print(f"{name:34s} {med(xs):9.3f} {min(xs):7.3f} {max(xs):7.3f}")
    print(f"(batch {args.batch}, {args.steps} DDIM steps, {torch.get_num_threads()} threads, {args.repeats} repeats)")
    print(f"RESULT capture_off_overhead_pct={overhead:.2f}")
    print(f"RESULT cfg1_time_saving_pct={saving:.1f}")
    print(f"RESULT cfg75_images_per_s={args.batch / med(cfg75):.2f}")
    print(f"RESULT cfg1_images_per_s={args.batch / med(cfg1):.2f}")


if __name__ == "__main__":
    main()
