"""Kill a real training run with SIGKILL at random moments, inside checkpoint saves and between them, resume it
after every kill, and report what the user is left with each time.

    python scripts/fault_injection.py --kills 10              # prints a table and RESULT lines

The run is `train.py experiment=emoji_ldm` at a small size (a tiny stage 1 is trained first, unless
--autoencoder is given), with a checkpoint every --every steps. Each kill lands either while a checkpoint is
being written (its temporary file exists and has not been renamed into place) or at a random moment between
saves. After each kill it checks that `last.ckpt` loads, how many optimizer steps were lost (reached before the
kill, minus the checkpoint's step: at most one checkpoint interval), and that the checkpoint's EMA has made one
update per optimizer step; then it resumes in the same folder (`ckpt_path=.../last.ckpt`). At the end: the run
reached max_steps, the EMA count equals the step count, no temporary file is left, and metrics.csv holds every
step exactly once.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent

SMALL_DATA = [
    "data.build.subset=32", "data.build.holdout=4", "data.build.shard_size=8", "data.batch_size=8",
    "data.num_workers=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
]
SMALL_LDM = [
    "model.unet.model_channels=32", "model.unet.num_heads=2", "callbacks.sample_images.every_n_steps=0",
    "callbacks.sample_images.at_train_end=false", "model.lr_schedule.warmup_steps=0",
]


class StepFile(L.Callback):
    """Writes the optimizer step reached after every batch (the run's progress as the killer sees it)."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.out.write_text(str(trainer.global_step))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{SCRIPTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "WANDB_MODE": "offline"}


def _read_step(path: Path) -> int:
    try:
        return int(path.read_text() or -1)
    except (FileNotFoundError, ValueError):
        return -1


def _temporaries(folder: Path) -> list[Path]:
    return list(folder.glob(".*.tmp-*")) if folder.is_dir() else []


def _checkpoint(path: Path) -> dict | None:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable is what this counts
        return None


def train_autoencoder(out: Path, data_dir: Path) -> Path:
    subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=emoji_autoencoder", f"hydra.run.dir={out}",
                    f"paths.data_dir={data_dir}", *SMALL_DATA, "trainer.max_steps=20"], cwd=ROOT, env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out / "checkpoints" / "last.ckpt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=80, help="trainer.max_steps of the run")
    parser.add_argument("--every", type=int, default=5, help="checkpoint interval (optimizer steps)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "fault_injection")
    parser.add_argument("--autoencoder", type=Path, default=None, help="a stage-1 checkpoint (default: train one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = args.out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    data_dir = out / "data"
    autoencoder = args.autoencoder or train_autoencoder(out / "autoencoder", data_dir)
    run_dir, step_file = out / "run", out / "step"
    checkpoints, last = run_dir / "checkpoints", run_dir / "checkpoints" / "last.ckpt"
    command = [sys.executable, str(ROOT / "train.py"), "experiment=emoji_ldm", f"hydra.run.dir={run_dir}",
               f"paths.data_dir={data_dir}", f"autoencoder.ckpt_path={autoencoder}", *SMALL_DATA, *SMALL_LDM,
               f"trainer.max_steps={args.steps}", f"callbacks.model_checkpoint.every_n_train_steps={args.every}",
               "data.epoch_length=400", "+callbacks.step_file._target_=fault_injection.StepFile",
               f"+callbacks.step_file.out={step_file}", *args.overrides]

    rows = []
    for kill in range(1, args.kills + 1):
        resume = [f"ckpt_path={last}"] if last.exists() else []
        start_step = _read_step(step_file)
        proc = subprocess.Popen(command + resume, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        inside_save = rng.random() < 0.5
        # Let the resumed run take at least one step of its own, then pick the moment.
        while _read_step(step_file) <= max(start_step, 0) and proc.poll() is None:
            time.sleep(0.01)
        if inside_save:
            while not _temporaries(checkpoints) and proc.poll() is None:
                time.sleep(0.0002)
            time.sleep(rng.uniform(0.0, 0.01))  # somewhere in the write, fsync or rename
        else:
            time.sleep(rng.uniform(0.0, 2.0))
        saving = bool(_temporaries(checkpoints))
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before kill {kill} (exit {proc.returncode}): use more --steps")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        reached = _read_step(step_file)
        ckpt = _checkpoint(last) if last.exists() else None
        saved = None if ckpt is None else int(ckpt["global_step"])
        ema = None if ckpt is None else int(ckpt["state_dict"]["ema.num_updates"])
        rows.append({"kill": kill, "where": "inside a save" if saving else "between saves", "reached": reached,
                     "last.ckpt": "unreadable" if last.exists() and ckpt is None else saved,
                     "loadable": ckpt is not None or not last.exists(), "lost": reached - (saved or 0),
                     "ema_ok": ema == saved, "temporaries": len(_temporaries(checkpoints))})
        print(f"kill {kill:2d} {rows[-1]['where']:14s} at step {reached:3d}: last.ckpt step {saved}, "
              f"{rows[-1]['lost']} steps lost, EMA updates {ema}, temporary files {rows[-1]['temporaries']}",
              flush=True)

    proc = subprocess.run(command + [f"ckpt_path={last}"], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the final resume failed: {proc.stderr[-2000:]}")
    final = _checkpoint(last)
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    complete = sorted(steps) == list(range(args.steps))
    loadable = sum(r["loadable"] for r in rows)
    lost = [r["lost"] for r in rows]
    inside = sum(r["where"] == "inside a save" for r in rows)
    print(f"\n{len(rows)} kills ({inside} inside a save, {len(rows) - inside} between saves), {len(rows)} resumes")
    print(f"last.ckpt loadable after {loadable} of {len(rows)} kills")
    print(f"steps lost per kill: max {max(lost)}, mean {sum(lost) / len(lost):.1f} (checkpoint interval {args.every})")
    print(f"EMA updates equal optimizer steps: after {sum(r['ema_ok'] for r in rows)} of {len(rows)} kills; at the end "
          f"{int(final['state_dict']['ema.num_updates'])} updates for {final['global_step']} steps")
    print(f"temporary files left at the end: {len(_temporaries(checkpoints))}; metrics.csv holds every step once: "
          f"{complete}")
    print(f"RESULT kills={len(rows)}")
    print(f"RESULT kills_inside_save={inside}")
    print(f"RESULT resumes={len(rows)}")
    print(f"RESULT last_ckpt_loadable={loadable}/{len(rows)}")
    print(f"RESULT max_steps_lost={max(lost)}")
    print(f"RESULT mean_steps_lost={sum(lost) / len(lost):.2f}")
    print(f"RESULT checkpoint_interval={args.every}")
    print(f"RESULT ema_updates_equal_steps={sum(r['ema_ok'] for r in rows)}/{len(rows)}")
    print(f"RESULT final_step={final['global_step']}/{args.steps}")
    print(f"RESULT final_ema_updates={int(final['state_dict']['ema.num_updates'])}")
    print(f"RESULT temporary_files_left={len(_temporaries(checkpoints))}")
    print(f"RESULT metrics_rows_complete={complete}")


if __name__ == "__main__":
    main()
