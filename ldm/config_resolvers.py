"""OmegaConf resolvers the configs use; registered by the entry points before a config is resolved.

    ${if:COND,A,B}         A when COND is true, else B: defaults that depend on another setting, e.g. DreamBooth's
                           learning rate (2e-6 with the text encoder trained, 5e-6 without)
    ${nonnull:A,B,...}     the list of the values that are not null, e.g. sample prompts where one is optional
    ${ldm_path:REL}        the absolute path of a file shipped inside the ldm package, e.g. reference statistics
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import ListConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("if"):
        OmegaConf.register_new_resolver("if", lambda condition, a, b: a if condition else b)
    if not OmegaConf.has_resolver("nonnull"):
        # A ListConfig, not a list: OmegaConf.resolve cannot store a plain list where another key points to it.
        OmegaConf.register_new_resolver("nonnull", lambda *values: ListConfig([v for v in values if v is not None]))
    if not OmegaConf.has_resolver("ldm_path"):
        OmegaConf.register_new_resolver("ldm_path", lambda rel: str(PACKAGE_DIR / rel))
