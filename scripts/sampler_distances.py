"""How close fast samplers get to a long DDIM run, in latent space, on a trained model.

    python scripts/sampler_distances.py --ckpt runs/quickstart/ldm/checkpoints/last.ckpt

The reference is DDIM (η = 0) at 200 steps from the same initial noise and prompt. For each sampler and step
count, the distance is the RMS difference of the final latents, averaged over the prompts. Ends with
`RESULT name=value` lines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.pipeline import LatentDiffusionPipeline  # noqa: E402
from ldm.training.checkpoint import load_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--reference-steps", type=int, default=200)
    parser.add_argument("--cfg-scale", type=float, default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = LatentDiffusionPipeline.from_checkpoint(args.ckpt)
    prompts = list(load_checkpoint(args.ckpt)["hyper_parameters"]["sampling"]["prompts"])

    def latents(sampler: str, steps: int) -> torch.Tensor:
        return pipe.generate(prompts, sampler=sampler, steps=steps, cfg_scale=args.cfg_scale, seed=0,
                             batch_size=len(prompts)).latents

    reference = latents("ddim", args.reference_steps)
    scale = reference.pow(2).mean().sqrt()
    print(f"reference: DDIM {args.reference_steps} steps, {len(prompts)} prompts, latent RMS {scale:.3f}")
    print(f"{'sampler':10s} {'steps':>5s} {'RMS distance':>13s} {'relative':>9s}")
    results = {}
    for sampler in ("ddim", "dpmpp_2m"):
        for steps in (10, 20, 50):
            d = (latents(sampler, steps) - reference).pow(2).flatten(1).mean(1).sqrt().mean()
            results[(sampler, steps)] = float(d)
            print(f"{sampler:10s} {steps:5d} {d:13.4f} {d / scale:9.3f}")
    for (sampler, steps), d in results.items():
        print(f"RESULT {sampler}_{steps}_vs_ddim{args.reference_steps}={d:.4f}")
    print(f"RESULT dpmpp20_over_ddim20={results[('dpmpp_2m', 20)] / results[('ddim', 20)]:.3f}")


if __name__ == "__main__":
    main()
