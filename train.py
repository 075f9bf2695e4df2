"""Train a stage of the latent diffusion model: `python train.py experiment=NAME [key=value ...]`.

Composes configs/train.yaml, instantiates the datamodule, the LightningModule, the callbacks, the loggers
and the trainer, each with a log line, then fits. `hydra.run.dir=DIR` puts everything the run writes
(checkpoints in DIR/checkpoints, logs, images) under DIR.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import hydra
import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ldm.cli_errors import friendly_errors
from ldm.cli_overrides import quote_brace_patterns
from ldm.config_checks import check_image_size, check_train_config
from ldm.config_resolvers import register_resolvers
from ldm.model import LatentDiffusion
from ldm.model_parts import SourceWeights

log = logging.getLogger("train")
register_resolvers()  # before Hydra composes the config


def instantiate_group(group: DictConfig | None, kind: str) -> list:
    objects = []
    for name, conf in (group or {}).items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info("Instantiating %s <%s> (%s)", kind, conf._target_, name)
            objects.append(hydra.utils.instantiate(conf))
    return objects


def missing_values(cfg: DictConfig, groups: tuple[str, ...]) -> list[str]:
    """Required values (``???``) that the given groups use, directly or through an interpolation."""
    found = []

    def walk(node, path: str) -> None:
        for key in node.keys():
            full = f"{path}.{key}"
            if OmegaConf.is_missing(node, key):
                found.append(f"{full} (set {full}=...)")
            elif OmegaConf.is_interpolation(node, key):
                ref = re.fullmatch(r"\$\{([\w.]+)\}", str(node._get_node(key)._value()))
                if ref:
                    try:
                        OmegaConf.select(cfg, ref.group(1), throw_on_missing=True)
                    except MissingMandatoryValue:
                        found.append(f"{ref.group(1)} (used by {full}; set {ref.group(1)}=...)")
            elif isinstance(node[key], DictConfig):
                walk(node[key], full)

    for group in groups:
        if isinstance(cfg.get(group), DictConfig):
            walk(cfg[group], group)
    return found


def unset_required(cfg: DictConfig) -> list[str]:
    """The keys an experiment lists under ``required`` that are still null or ``???``. (A ``???`` in an
    experiment cannot make a key required whose group default is null: merging ``???`` keeps the old value.)"""
    found = []
    for key in cfg.get("required") or []:
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except OmegaConfBaseException:  # ??? itself, or an interpolation that leads to one
            value = None
        if value is None:
            found.append(f"{key} (set {key}=...)")
    return found


def load_init(cfg: DictConfig) -> SourceWeights | None:
    """``init_from=PATH``: the imported weights a stage-2 run starts from (LatentDiffusion.read_source), or None."""
    if not cfg.get("init_from"):
        return None
    if "unet" not in cfg.model:
        raise ValueError("init_from starts a stage-2 (text-to-image) experiment; this one trains no U-Net")
    log.info("Loading init_from=%s", cfg.init_from)
    # Each process of a multi-process run writes its own copy of a converted text encoder, so that none reads a
    # file another is writing; checkpoints (saved by rank 0) point at rank 0's.
    out_dir = Path(cfg.paths.output_dir) / "pretrained"
    if rank_zero_only.rank > 0:
        out_dir = out_dir / f"rank{rank_zero_only.rank}"
    init = LatentDiffusion.read_source(cfg.init_from, out_dir, use_ema=bool(cfg.get("init_from_ema", True)))
    if init.autoencoder_config is None and not cfg.autoencoder.get("ckpt_path"):
        raise ValueError(f"init_from {cfg.init_from} holds no autoencoder: set autoencoder.ckpt_path=PATH")
    return init


def build_module(cfg: DictConfig, init: SourceWeights | None) -> L.LightningModule:
    """The LightningModule of the stage: stage 2 gets the LatentDiffusion model its settings describe (built once,
    from init_from's weights where given); stage 1 is built from its config."""
    if "unet" not in cfg.model:
        return hydra.utils.instantiate(cfg.model)
    try:
        module_class = hydra.utils.get_class(cfg.model._target_)
    except Exception as e:  # noqa: BLE001 - ImportError, AttributeError, Hydra's own: all a wrong config value
        raise ValueError(f"config error at 'model._target_': cannot import {cfg.model._target_} "
                         f"({(str(e).splitlines() or [''])[0]})") from e
    return module_class.from_settings(cfg.model, source=init)


def check_data_sizes(datamodule, model) -> None:
    """Image sizes the model can take, checked before the first step fails on a latent-size mismatch."""
    if getattr(datamodule, "resolution", None) is not None:
        check_image_size(int(datamodule.resolution), model, "data.resolution")
    buckets = getattr(datamodule, "buckets", None)
    for height, width in getattr(buckets, "sizes", None) or []:
        for side in (height, width):
            check_image_size(int(side), model, f"data.buckets ({height}×{width})")


def train(cfg: DictConfig) -> dict:
    # Required values fail here, all named at once with the key to set, before any work is done: the
    # experiment's `required` list, top-level ??? (e.g. DreamBooth's instance_data) and ??? in the groups.
    top_level = [f"{k} (set {k}=...)" for k in cfg if OmegaConf.is_missing(cfg, k)]
    init_given = "init_from" in cfg and not OmegaConf.is_missing(cfg, "init_from") and cfg.init_from
    if init_given and OmegaConf.is_missing(cfg.autoencoder, "ckpt_path"):
        cfg.autoencoder.ckpt_path = None  # the imported weights bring their autoencoder
    missing = unset_required(cfg) + top_level + missing_values(cfg, ("data", "model", "callbacks", "logger", "trainer"))
    named = {}  # key → message: a key the experiment lists that is also ??? is named once
    for message in missing:
        named.setdefault(message.split(" ")[0], message)
    if named:
        raise ValueError("missing required value(s): " + "; ".join(named.values()))
    check_train_config(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)))
    init = load_init(cfg)
    if init is not None and "resolution" in cfg.data and cfg.data.resolution is None:
        # DreamBooth's default: the resolution the base model was trained at (512 for SD, 32 for the emoji model).
        if init.resolution is None:
            raise ValueError(f"init_from {cfg.init_from} does not say what resolution it was trained at: "
                             "set data.resolution=...")
        cfg.data.resolution = int(init.resolution)
        log.info("data.resolution = %d, the resolution %s was trained at", init.resolution, cfg.init_from)
    OmegaConf.resolve(cfg)
    L.seed_everything(cfg.seed, workers=True)

    log.info("Instantiating datamodule <%s>", cfg.data._target_)
    datamodule = hydra.utils.instantiate(cfg.data)
    log.info("Instantiating model <%s>", cfg.model._target_)
    model = build_module(cfg, init)
    check_data_sizes(datamodule, model)
    callbacks = instantiate_group(cfg.get("callbacks"), "callback")
    loggers = instantiate_group(cfg.get("logger"), "logger")
    log.info("Instantiating trainer <%s>", cfg.trainer._target_)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    log.info("Output directory: %s", cfg.paths.output_dir)
    log.info("Starting training")
    trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("Final metrics: %s", ", ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items())))
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@friendly_errors
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    sys.argv = quote_brace_patterns(sys.argv)  # data.train_shards='/data/{00000..01023}.tar' as written
    main()
