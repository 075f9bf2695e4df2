"""Inference-only weights from a stage-2 checkpoint: `python -m ldm.export CKPT OUT_DIR [--raw] [--dtype float16]`.

OUT_DIR/model.safetensors   the U-Net (its EMA weights unless --raw), the autoencoder and any trainable
                            conditioner parts; the model's hyperparameters as JSON in the file's metadata
OUT_DIR/config.yaml         the same hyperparameters, readable
OUT_DIR/train_config.yaml   the run's resolved Hydra config, when found next to the checkpoint

No optimizer state, no second U-Net, no training loop state: a fraction of the checkpoint, loadable without
unpickling anything. `python sample.py ckpt=OUT_DIR` and `LatentDiffusionPipeline.from_checkpoint(OUT_DIR)`
read it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.model_io import EXPORT_WEIGHTS, export_weights_path, load_export, write_export
from ldm.weights_io import CheckpointError, load_checkpoint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export(ckpt_path: str | Path, out_dir: str | Path, use_ema: bool = True, dtype: str = "float32") -> dict:
    """Write the export of ``ckpt_path`` into ``out_dir``; returns {"weights": path, "tensors", "bytes", ...}."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path, "checkpoint")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    if "unet" not in hparams or "autoencoder" not in hparams:
        raise CheckpointError(f"{ckpt_path} is not a stage-2 (text-to-image) checkpoint of this framework")
    state = ckpt["state_dict"]
    ema = use_ema and any(k.startswith("ema.model.") for k in state)
    source = "ema.model." if ema else "unet."
    weights: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(source):
            weights["unet." + key[len(source):]] = value
        elif not key.startswith(("unet.", "ema.")):  # autoencoder, trainable conditioner parts
            weights[key] = value
    cast = DTYPES[dtype]
    weights = {k: (v.to(cast) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    hparams.pop("autoencoder_ckpt", None)
    hparams["ema"] = None  # the exported U-Net is the average itself
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / EXPORT_WEIGHTS
    unet_weights = "ema" if ema else "raw"
    write_export(weights, hparams, path, {"source": str(ckpt_path), "unet_weights": unet_weights,
                                          "global_step": str(ckpt.get("global_step", ""))})
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(hparams)))
    run_config = ckpt_path.resolve().parent.parent / ".hydra" / "config.yaml"
    if run_config.is_file():
        shutil.copyfile(run_config, out_dir / "train_config.yaml")
    return {"weights": str(path), "tensors": len(weights), "bytes": path.stat().st_size,
            "checkpoint_bytes": ckpt_path.stat().st_size, "unet_weights": unet_weights}


__all__ = ["export", "export_weights_path", "load_export"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a stage-2 checkpoint (.ckpt)")
    parser.add_argument("out_dir", help="the folder to write")
    parser.add_argument("--raw", action="store_true", help="the trained U-Net weights, not their EMA")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="storage type of the weights (float16/bfloat16 halve the file; loaded as float32)")
    args = parser.parse_args(argv)
    try:
        info = export(args.ckpt, args.out_dir, use_ema=not args.raw, dtype=args.dtype)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {info['weights']}: {info['tensors']} tensors ({info['unet_weights']} U-Net), "
          f"{info['bytes'] / 1e6:.1f} MB (checkpoint {info['checkpoint_bytes'] / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
