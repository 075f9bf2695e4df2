"""Shard specs: what users write in `data.train_shards` (a brace pattern, a glob, a folder, a URL, or a list of
them) turned into the list of shard URLs/paths that a ShardDataset reads."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import braceexpand

ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]

_REMOTE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")
_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_shards(spec: ShardSpec) -> list[str]:
    """Turn a shard spec into a list of shard URLs/paths.

    Accepts a brace pattern ("data/emoji-{000000..000003}.tar"), a glob ("data/*.tar"), a local folder (all
    `*.tar` directly inside it, sorted; sub-folders are not searched), a remote URL (`pipe:`, `s3://`, `http://`;
    brace-expanded, not checked), or a list of any of these. Local files must exist: a typo in a range should
    fail here, naming the spec, not as an empty epoch later.
    """
    if isinstance(spec, (str, os.PathLike)):
        items: list[Any] = [spec]
    elif isinstance(spec, Iterable):  # list, tuple, omegaconf ListConfig
        items = list(spec)
    else:
        raise TypeError(f"shard spec must be a string, path or list of them, got {type(spec).__name__}")
    if not items:
        raise FileNotFoundError(f"shard spec {spec!r} is empty")

    urls: list[str] = []
    missing: list[str] = []
    for item in items:
        text = os.fspath(item)
        if _REMOTE.match(text):
            urls.extend(braceexpand.braceexpand(text))
            continue
        text = os.path.expanduser(text)
        if os.path.isdir(text):
            found = sorted(glob.glob(os.path.join(glob.escape(text), "*.tar")))
            if not found:
                raise FileNotFoundError(f"no *.tar shards in folder {text!r} (shard spec {spec!r})")
            urls.extend(found)
            continue
        for path in braceexpand.braceexpand(text):
            if _GLOB_CHARS.search(path):
                found = sorted(glob.glob(path))
                if found:
                    urls.extend(found)
                else:
                    missing.append(path)
            elif os.path.isfile(path):
                urls.append(path)
            else:
                missing.append(path)
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise FileNotFoundError(f"shard spec {spec!r}: no shard matches {shown}")
    if not urls:
        raise FileNotFoundError(f"shard spec {spec!r} matched no shards")
    return urls


def shorten(urls: Sequence[str], n: int = 4) -> str:
    """The first few URLs and how many there are in all, for messages about large shard sets."""
    shown = ", ".join(urls[:n])
    return shown + (f", ... ({len(urls)} shards)" if len(urls) > n else "")
