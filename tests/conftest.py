"""Shared test setup: offline, deterministic, CPU. Expensive fixtures live in the test modules that use them."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "fixtures", "fope")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
