"""How close fast samplers get to a long DDIM run, in latent space, on a trained model.

    python scripts/sampler_distances.py --ckpt runs/quickstart/ldm/checkpoints/last.ckpt

The reference is DDIM (η = 0) at 200 steps from the same initial noise and prompt. For each sampler and step
count, the distance is the RMS difference of the final latents, averaged over the prompts. Ends with
`RESULT name=value` lines.

DDIM steps over Stable Diffusion's "leading" timesteps (steps_offset 1: 951, 901, …, 1 for 20 steps), DPM-Solver++
over diffusers' default "linspace" ones (999, 949, …, 50): they start from the same noise at different times.
`dpmpp_2m_leading` is DPM-Solver++ on DDIM's timesteps, which separates the solver's error from that difference.
They also end differently: SD's DDIM (set_alpha_to_one = False) stops at ᾱ_0, a noise level of σ = 0.03, and
DPM-Solver++ at σ = 0, its x0 prediction. The second table repeats the measure with DDIM ending at σ = 0 too
(`ddim_to_zero`: set_alpha_to_one = True, reference and candidates alike): the same ODE solved to the same end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from functools import partial  # noqa: E402

from ldm.diffusion.k_samplers import sample_dpmpp_2m  # noqa: E402
from ldm.diffusion.samplers import SAMPLERS, sample_ddim  # noqa: E402
from ldm.pipeline import LatentDiffusionPipeline  # noqa: E402
from ldm.weights_io import load_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--reference-steps", type=int, default=200)
    parser.add_argument("--cfg-scale", type=float, default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    SAMPLERS["dpmpp_2m_leading"] = partial(sample_dpmpp_2m, timestep_spacing="leading", steps_offset=1)
    SAMPLERS["ddim_to_zero"] = partial(sample_ddim, set_alpha_to_one=True)
    pipe = LatentDiffusionPipeline.from_checkpoint(args.ckpt)
    prompts = list(load_checkpoint(args.ckpt)["hyper_parameters"]["sampling"]["prompts"])

    def latents(sampler: str, steps: int) -> torch.Tensor:
        return pipe.generate(prompts, sampler=sampler, steps=steps, cfg_scale=args.cfg_scale, seed=0,
                             batch_size=len(prompts)).latents

    results = {}
    for ref_name, candidates in (("ddim", ("ddim", "dpmpp_2m", "dpmpp_2m_leading")),
                                 ("ddim_to_zero", ("ddim_to_zero", "dpmpp_2m", "dpmpp_2m_leading"))):
        reference = latents(ref_name, args.reference_steps)
        scale = reference.pow(2).mean().sqrt()
        print(f"\nreference: {ref_name} {args.reference_steps} steps, {len(prompts)} prompts, latent RMS {scale:.3f}")
        print(f"{'sampler':17s} {'steps':>5s} {'RMS distance':>13s} {'relative':>9s}")
        for sampler in candidates:
            for steps in (10, 20, 50):
                d = (latents(sampler, steps) - reference).pow(2).flatten(1).mean(1).sqrt().mean()
                results[(ref_name, sampler, steps)] = float(d)
                print(f"{sampler:17s} {steps:5d} {d:13.4f} {d / scale:9.3f}")
    for (ref_name, sampler, steps), d in results.items():
        print(f"RESULT {sampler}_{steps}_vs_{ref_name}{args.reference_steps}={d:.4f}")
    for ref_name in ("ddim", "ddim_to_zero"):
        ddim20 = results[(ref_name, ref_name, 20)]
        for sampler in ("dpmpp_2m", "dpmpp_2m_leading"):
            print(f"RESULT {sampler}20_over_{ref_name}20={results[(ref_name, sampler, 20)] / ddim20:.3f}")


if __name__ == "__main__":
    main()
