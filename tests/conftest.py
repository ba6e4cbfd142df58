"""Shared test setup: offline, deterministic, CPU. Expensive fixtures live in the test modules that use them."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "fope")  # the official code's outputs (its README)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One CPU thread: tiny models run many small ops, which OpenMP threads on a shared 2-core machine slow ~6x.
    Modules of tiny-tensor tests use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedded_data_root(tmp_path_factory):
    """A data root holding the embedded corpus, prepared once per test session (a few seconds)."""
    from hydra import compose, initialize_config_dir

    from fope_lm.data import ensure_prepared

    root = tmp_path_factory.mktemp("data")
    with initialize_config_dir(config_dir=os.path.join(REPO_ROOT, "configs"), version_base="1.3"):
        defaults = compose("train").data
    ensure_prepared({**defaults, "root": str(root)})
    return root
