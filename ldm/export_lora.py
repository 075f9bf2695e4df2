"""Write the LoRA adapters of a stage-2 checkpoint alone: `python -m ldm.export_lora CKPT OUT.safetensors`.

The file holds only the A and B matrices (and the LoRA settings as metadata), a small fraction of the model:
apply it to the base model with `python sample.py ckpt=BASE lora=OUT.safetensors lora_scale=0.8` or
`LatentDiffusionPipeline.apply_lora`. The U-Net's adapters come from its EMA copy when the checkpoint has one
(what sample.py uses by default); `--raw` takes the trained weights instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ldm.modules.lora import ADAPTER, LoRAError, LoRASettings, save_lora
from ldm.weights_io import CheckpointError, load_checkpoint


def _adapters(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``prefix<path>.lora_A.default.weight`` → ``<path>.lora_A.weight``."""
    return {k[len(prefix):].replace(f".{ADAPTER}.", "."): v for k, v in state.items()
            if k.startswith(prefix) and (".lora_A." in k or ".lora_B." in k)}


def export_lora(ckpt_path: str | os.PathLike, out: str | os.PathLike, use_ema: bool = True) -> dict[str, int]:
    """Writes the adapters of ``ckpt_path`` to ``out``; returns the tensor counts per part and the file sizes."""
    ckpt = load_checkpoint(ckpt_path, "checkpoint")
    hparams = ckpt.get("hyper_parameters") or {}
    if "unet" not in hparams:
        raise CheckpointError(f"{ckpt_path} is not a stage-2 checkpoint of this framework")
    if not hparams.get("lora"):
        raise LoRAError(f"{ckpt_path} was not trained with LoRA (lora.enabled=true): it holds no adapters")
    state = ckpt["state_dict"]
    ema = use_ema and any(k.startswith("ema.model.") for k in state)
    parts = {"unet": _adapters(state, "ema.model." if ema else "unet."),
             "text_encoder": _adapters(state, "conditioner.text.")}
    settings = LoRASettings.parse(hparams["lora"])
    save_lora(out, parts, settings, extra={"source": str(ckpt_path), "unet_weights": "ema" if ema else "raw"})
    unet_full = sum(v.numel() * v.element_size() for k, v in state.items()
                    if k.startswith("unet.") and ".lora_" not in k)
    return {"unet_tensors": len(parts["unet"]), "text_encoder_tensors": len(parts["text_encoder"]),
            "adapter_bytes": Path(out).stat().st_size, "unet_bytes": unet_full,
            "checkpoint_bytes": Path(ckpt_path).stat().st_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a stage-2 checkpoint trained with lora.enabled=true")
    parser.add_argument("out", help="the adapter file to write (.safetensors)")
    parser.add_argument("--raw", action="store_true", help="the trained U-Net adapters, not their EMA")
    args = parser.parse_args(argv)
    try:
        info = export_lora(args.ckpt, args.out, use_ema=not args.raw)
    except (CheckpointError, LoRAError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}: {info['unet_tensors']} U-Net and {info['text_encoder_tensors']} text-encoder adapter "
          f"tensors, {info['adapter_bytes'] / 1e6:.3f} MB (U-Net weights {info['unet_bytes'] / 1e6:.1f} MB, "
          f"checkpoint {info['checkpoint_bytes'] / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
