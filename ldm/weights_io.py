"""Reading weight files safely, and saying plainly why one cannot be read."""

from __future__ import annotations

import re


def describe_load_error(error: BaseException) -> str:
    """The reason in torch.load's error, without its advice: the global a pickle refers to (a file that would run
    code), the unpickler's complaint (bytes that are no pickle), or the error's first line (zip/truncation)."""
    message = str(error)
    found = re.search(r"Unsupported global: GLOBAL [^\s]+", message)
    if found:
        return found.group(0)
    found = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(Check the documentation|$)", message, re.DOTALL)
    if found and found.group(1):
        return f"{type(error).__name__}: " + " ".join(found.group(1).split())[:200]
    return f"{type(error).__name__}: " + (message.strip().splitlines() or [""])[0][:200]


def refers_to_code(error: BaseException) -> bool:
    """Whether torch refused a pickle because it would build objects other than tensors (and could run code)."""
    return "Unsupported global" in str(error)
