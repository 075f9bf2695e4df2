"""Turning the errors a user can cause into one clear line and a non-zero exit, instead of a traceback."""

from __future__ import annotations

import functools
import logging
import os
import sys

from hydra.errors import HydraException, InstantiationException
from omegaconf.errors import OmegaConfBaseException

from ldm.data.stats import NoUsableDataError
from ldm.errors import UserError

log = logging.getLogger("ldm")

# Errors that describe bad input (config, files, data), not bugs: reported in one line.
USER_ERRORS = (
    OmegaConfBaseException,
    HydraException,
    UserError,  # CheckpointError, TrainingDivergedError, ...
    NoUsableDataError,
    FileNotFoundError,
    FloatingPointError,
    ValueError,
)


def _describe(e: BaseException) -> str:
    if isinstance(e, InstantiationException):
        # Hydra's message names the target and ends with the config key; drop its advice about HYDRA_FULL_ERROR.
        text = str(e)
        key = text.split("full_key:")[-1].strip() if "full_key:" in text else None
        first = text.split("\nfull_key")[0].split(", set env var HYDRA_FULL_ERROR")[0].replace("\n", " ").strip()
        return f"config error at '{key}': {first}" if key else f"config error: {first}"
    if isinstance(e, OmegaConfBaseException):
        key = getattr(e, "full_key", None)
        first = str(e).splitlines()[0]
        return f"config error at '{key}': {first}" if key else f"config error: {first}"
    if isinstance(e, NoUsableDataError):
        # Raised in a DataLoader worker, the message carries the worker's traceback: keep its last line.
        return f"data error: {str(e).strip().splitlines()[-1].removeprefix('NoUsableDataError: ')}"
    return f"{type(e).__name__}: {e}"


def friendly_errors(main):
    """Run ``main``; a user error is logged as one line and exits with status 1 (HYDRA_FULL_ERROR=1 re-raises)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            message = _describe(e)
            if logging.getLogger().handlers:
                log.error("%s", message)
            else:
                print(f"error: {message}", file=sys.stderr)
            sys.exit(1)

    return wrapper
