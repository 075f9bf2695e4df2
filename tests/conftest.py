import os
import sys

import pytest
import torch

# Tests import the shared oracle helpers from this folder.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The test models are tiny: one thread avoids the oversubscription that makes two-thread torch crawl when
# anything else shares the two cores (subprocess runs keep their own default).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # `slow` checks run only when selected (`-m slow`): the default run must stay within minutes on 2 cores.
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: select with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
