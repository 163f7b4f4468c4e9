import logging
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

warnings.filterwarnings("ignore", ".*does not have many workers.*")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _quiet_lightning():
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def loaders():
    from models import digits_loaders

    return digits_loaders()


@pytest.fixture
def gw_log(caplog):
    """caplog at INFO for gradwatch's logger (it propagates: import gradwatch leaves that alone)."""
    caplog.set_level(logging.INFO, logger="gradwatch")
    return caplog
