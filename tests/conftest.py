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
