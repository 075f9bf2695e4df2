"""Seconds per stage-1 training step of two settings, measured side by side in one process.

    python scripts/autoencoder_step_time.py --a model.autoencoder.norm_group_channels=1 --b model.autoencoder.norm=none

Each setting is composed as train.py composes it (`experiment=emoji_autoencoder` plus its overrides) and its
autoencoder, loss and optimizer are built from that config. Both then train on the same real batches of the
emoji shards, in alternating blocks of steps, so that whatever else runs on the machine slows both alike. A step
is what Lightning runs: forward, loss, backward, gradient clipping, optimizer step. Prints the median seconds
per step of each and their ratio (B / A), then `RESULT` lines. Set the threads with OMP_NUM_THREADS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ldm.config_resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["experiment=emoji_autoencoder", *overrides], return_hydra_config=True)
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:runtime.cwd} in the paths
    return OmegaConf.create({k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "data", "trainer")})


class Setting:
    def __init__(self, name: str, overrides: list[str]):
        import hydra

        self.name, self.overrides = name, overrides
        cfg = compose(overrides)
        torch.manual_seed(0)
        self.module = hydra.utils.instantiate(cfg.model)
        hp = self.module.hparams  # the optimizer AutoencoderModule.configure_optimizers builds (no discriminator)
        self.optimizer = torch.optim.AdamW(self.module.autoencoder.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                           weight_decay=hp.weight_decay, fused=hp.fused_optimizer or None)
        self.clip = cfg.trainer.gradient_clip_val
        self.data = cfg.data
        self.times: list[float] = []

    def step(self, x: torch.Tensor) -> None:
        start = time.perf_counter()
        ae, loss = self.module.autoencoder, self.module.loss
        x_rec, posterior = ae(x)
        total, _ = loss.generator_loss(x, x_rec, posterior, step=0, last_layer=ae.decoder.conv_out.weight)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(ae.parameters(), self.clip)
        self.optimizer.step()
        self.times.append(time.perf_counter() - start)


def batches(data_cfg, count: int) -> list[torch.Tensor]:
    import hydra

    from ldm.data.shards import ShardDataset

    if data_cfg.get("build") is not None:
        hydra.utils.instantiate(data_cfg.build)()  # the emoji shards, built on first use as train.py does
    dataset = ShardDataset(data_cfg.train_shards, resolution=data_cfg.resolution, shuffle=False, resampled=False)
    images = []
    for sample in dataset:
        images.append(sample["image"])
        if len(images) == count * data_cfg.batch_size:
            break
    return list(torch.stack(images).split(data_cfg.batch_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", nargs="*", default=[], help="overrides of setting A")
    parser.add_argument("--b", nargs="*", default=[], help="overrides of setting B")
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each setting")
    parser.add_argument("--block", type=int, default=5, help="steps of one setting before switching")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each first")
    args = parser.parse_args()

    a, b = Setting("A", args.a), Setting("B", args.b)
    if a.data.batch_size != b.data.batch_size or a.data.resolution != b.data.resolution:
        print(f"note: the settings train on different batches ({a.data.batch_size}×{a.data.resolution}px vs "
              f"{b.data.batch_size}×{b.data.resolution}px); seconds per step compare steps, not samples")
    data = {s.name: batches(s.data, 8) for s in (a, b)}
    for s in (a, b):
        for i in range(args.warmup):
            s.step(data[s.name][i % len(data[s.name])])
        s.times.clear()
    done = 0
    while done < args.steps:
        for s in (a, b):
            for i in range(done, min(done + args.block, args.steps)):
                s.step(data[s.name][i % len(data[s.name])])
        done += args.block

    print(f"torch threads: {torch.get_num_threads()}; {args.steps} steps each, alternating blocks of {args.block}")
    medians = {}
    for s in (a, b):
        medians[s.name] = statistics.median(s.times)
        params = sum(p.numel() for p in s.module.autoencoder.parameters())
        print(f"{s.name}: {' '.join(s.overrides) or '(experiment defaults)'}\n   {params:,} parameters, batch "
              f"{s.data.batch_size}: median {medians[s.name]:.3f} s/step (quartiles "
              f"{statistics.quantiles(s.times, n=4)[0]:.3f}–{statistics.quantiles(s.times, n=4)[2]:.3f})")
    print(f"RESULT seconds_per_step_a={medians['A']:.4f}")
    print(f"RESULT seconds_per_step_b={medians['B']:.4f}")
    print(f"RESULT ratio_b_over_a={medians['B'] / medians['A']:.3f}")


if __name__ == "__main__":
    main()
