"""Command-line overrides that Hydra's grammar would reject but users write all the time.

Webdataset shard lists are brace patterns, `data.train_shards='/data/{00000..01023}.tar'` (the shell quotes stop
bash from expanding the braces itself). Hydra then reads `{` as the start of a dictionary and fails with
"mismatched input '{'". A brace group without a colon (`{000..123}`, `{train,val}`) cannot be a Hydra dictionary,
so such a value is handed to Hydra as a quoted string: the command works as written.
"""

from __future__ import annotations

import re

# {a..b} or {x,y} with no ':' inside (a Hydra dict always has key: value)
_BRACE_PATTERN = re.compile(r"\{[^{}:]*(\.\.|,)[^{}:]*\}")
_OVERRIDE = re.compile(r"^([+~]{0,2}[\w./@-]+)=(.*)$", re.DOTALL)


def quote_brace_patterns(args: list[str]) -> list[str]:
    """``key=/data/{0..9}.tar`` → ``key='/data/{0..9}.tar'``; every other argument unchanged."""
    out = []
    for arg in args:
        match = _OVERRIDE.match(arg)
        if match and _BRACE_PATTERN.search(match.group(2)) and not match.group(2).startswith(("'", '"', "[")):
            value = match.group(2).replace("\\", "\\\\").replace("'", "\\'")
            arg = f"{match.group(1)}='{value}'"
        out.append(arg)
    return out
