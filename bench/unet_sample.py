"""U-Net inference: a 50-step DDIM loop with classifier-free guidance, ours against diffusers.

    python bench/unet_sample.py --config emoji              # 16 images of 4×8×8, guidance 7.5
    python bench/unet_sample.py --config sd1 --batch 1 --latent 32

Ours: ldm.diffusion.samplers.sample_ddim driving ldm.diffusion.guidance.cfg_model_fn (one forward of
[uncond, cond] per step) inside ``unet.cache_context()``, as LatentDiffusionPipeline.generate runs it.
Theirs: diffusers' DDIMScheduler (scaled_linear 0.00085..0.012, steps_offset 1, set_alpha_to_one False) driving
its UNet2DConditionModel on the same batched [uncond, cond] input, built from our weights. Both start from the
same noise; the final latents are compared so that a fast wrong answer cannot pass.

--mask gives the prompt real caption lengths and the empty prompt its two tokens, as the text conditioner does.
"""

from __future__ import annotations

import copy
import random

import torch

from common import (SD_SCHEDULER, autocast, base_parser, build_unet, diffusers_unet_sharing, fmt, paired_ratio,
                    print_header, print_table, result, setup, spread, summary, time_alternately)
from unet_train import CONTEXT_LEN, caption_token_counts

SIZES = {"emoji": dict(batch=16, latent=8), "sd1": dict(batch=1, latent=32), "sd2": dict(batch=1, latent=32)}
CFG_SCALE = 7.5


def inputs(kwargs, batch, latent, device, mask):
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(batch, kwargs.get("in_channels", 4), latent, latent, generator=g).to(device)
    cond = torch.randn(batch, CONTEXT_LEN, kwargs["context_dim"], generator=g).to(device)
    uncond = torch.randn(1, CONTEXT_LEN, kwargs["context_dim"], generator=g).to(device)  # the empty prompt
    cond_mask = uncond_mask = None
    if mask:
        rng = random.Random(0)
        lengths = torch.tensor([rng.choice(caption_token_counts()) for _ in range(batch)])
        cond_mask = (torch.arange(CONTEXT_LEN)[None] < lengths[:, None]).to(device)
        uncond_mask = (torch.arange(CONTEXT_LEN)[None] < 2).to(device)  # BOS, EOS
    return x_T, cond, uncond, cond_mask, uncond_mask


def channels_last_copy(unet, ins):
    """A copy of the U-Net with channels_last (NHWC) weights, and the inputs with NHWC latents, as sample.py
    runs it (channels_last=true). A copy: diffusers' model shares our parameter tensors and keeps its layout."""
    return (copy.deepcopy(unet).to(memory_format=torch.channels_last),
            (ins[0].contiguous(memory_format=torch.channels_last), *ins[1:]))


def ours_sampler(unet, x_T, cond, uncond, cond_mask, uncond_mask, steps, args):
    from ldm.diffusion.guidance import cfg_model_fn
    from ldm.diffusion.samplers import sample_ddim
    from ldm.diffusion.schedule import NoiseSchedule

    schedule = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)

    def run():
        with torch.no_grad(), autocast(args), unet.cache_context():
            model_fn = cfg_model_fn(unet, cond, cond_mask, uncond, uncond_mask, cfg_scale=CFG_SCALE)
            return sample_ddim(model_fn, x_T, schedule, num_steps=steps, eta=0.0, steps_offset=1,
                               set_alpha_to_one=False)

    return run


def diffusers_sampler(unet, x_T, cond, uncond, cond_mask, uncond_mask, steps, args):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SD_SCHEDULER)
    batch = x_T.shape[0]
    context = torch.cat([uncond.expand(batch, -1, -1), cond])  # (2B, L, D), built once as a pipeline does
    mask = None if cond_mask is None else torch.cat([uncond_mask.expand(batch, -1), cond_mask])

    def run():
        scheduler.set_timesteps(steps)
        x = x_T
        with torch.no_grad(), autocast(args):
            for t in scheduler.timesteps:
                latent_in = scheduler.scale_model_input(torch.cat([x, x]), t)
                eps = unet(latent_in, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + CFG_SCALE * (eps_cond - eps_uncond)
                x = scheduler.step(eps, t, x).prev_sample
        return x

    return run


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--config", default="emoji", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=None, help="images (the U-Net sees twice as many)")
    parser.add_argument("--latent", type=int, default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--mask", action="store_true", help="padding masks of real caption lengths")
    parser.add_argument("--backend", default=None, choices=("sdpa", "math", "xformers"))
    parser.add_argument("--channels-last", action="store_true",
                        help="also ours with channels_last weights and latents, as sample.py runs it")
    args = parser.parse_args()
    args.batch = args.batch or SIZES[args.config]["batch"]
    args.latent = args.latent or SIZES[args.config]["latent"]
    args.repeats = args.repeats or (3 if args.quick or args.config != "emoji" else 5)
    setup(args)
    label = f"{args.config}_b{args.batch}_l{args.latent}" + ("_mask" if args.mask else "")
    print_header(f"DDIM {args.steps} steps with guidance {CFG_SCALE}: {label}, {args.dtype}, {args.device}", args)

    ours, kwargs = build_unet(args.config, args.device)
    if args.backend:
        ours.set_attention_backend(args.backend)
    theirs = diffusers_unet_sharing(ours, kwargs)
    ours.eval(), theirs.eval()
    ins = inputs(kwargs, args.batch, args.latent, args.device, args.mask)
    runs = {"ours": ours_sampler(ours, *ins, args.steps, args), "diffusers": diffusers_sampler(theirs, *ins, args.steps, args)}
    if args.channels_last:
        nhwc, nhwc_ins = channels_last_copy(ours, ins)
        runs["ours + channels_last"] = ours_sampler(nhwc, *nhwc_ins, args.steps, args)

    outputs = {name: run() for name, run in runs.items()}
    diff = max((outputs[name].float() - outputs["diffusers"].float()).abs().max().item()
               for name in outputs if name != "diffusers")
    scale = outputs["diffusers"].float().abs().max().item()
    times = time_alternately(runs, args.repeats, warmup=max(0, args.warmup - 1), device=args.device)

    rows = []
    for name in runs:
        s = summary(times[name])
        rows.append([name, spread(times[name]), fmt(args.batch / s["median"]), fmt(s["median"] / args.steps * 1e3)])
    print(f"{args.batch} images ({2 * args.batch} per U-Net call), latent 4×{args.latent}×{args.latent}, context "
          f"{CONTEXT_LEN}×{kwargs['context_dim']}{' with padding masks' if args.mask else ''}; {args.repeats} "
          f"alternating repeats; final latents differ by at most {diff:.2e} (largest value {scale:.2f})")
    print_table(["impl", "loop s (median [min–max])", "images/s", "ms per step"], rows)
    ratio = paired_ratio(times["ours"], times["diffusers"])
    print(f"speed ours/diffusers (paired): {ratio['median']:.3f} [{ratio['min']:.3f}–{ratio['max']:.3f}]")
    if args.channels_last:
        nhwc_ratio = paired_ratio(times["ours + channels_last"], times["diffusers"])
        print(f"speed ours with channels_last/diffusers (paired): {nhwc_ratio['median']:.3f} "
              f"[{nhwc_ratio['min']:.3f}–{nhwc_ratio['max']:.3f}]")
    if diff > 1e-3 * max(scale, 1.0) and args.dtype == "fp32":
        raise SystemExit(f"ours and diffusers disagree: max |Δ| = {diff:.3e}")
    result(f"sample_{label}_ours_images_per_s", args.batch / summary(times["ours"])["median"])
    result(f"sample_{label}_diffusers_images_per_s", args.batch / summary(times["diffusers"])["median"])
    result(f"sample_{label}_speed_ratio", ratio["median"])
    result(f"sample_{label}_max_abs_diff", diff)
    if args.channels_last:
        result(f"sample_{label}_ours_channels_last_images_per_s",
               args.batch / summary(times["ours + channels_last"])["median"])
        result(f"sample_{label}_speed_ratio_channels_last", nhwc_ratio["median"])


if __name__ == "__main__":
    main()
