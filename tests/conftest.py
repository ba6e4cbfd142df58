"""Shared test setup: offline, deterministic, CPU; the paths and fixtures several modules use (helpers/ holds the
shared functions). Expensive fixtures are session- or module-scoped."""

import logging
import os
import signal
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES_DIR = REPO / "tests" / "fixtures" / "fope"  # the official code's outputs (their README says how they were made)


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
def embedded_data_root(tmp_path_factory) -> Path:
    """A data root holding the embedded corpus, prepared once per test session (a few seconds)."""
    from hydra import compose, initialize_config_dir

    from fope_lm.data import ensure_prepared

    root = tmp_path_factory.mktemp("data")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        defaults = compose("train").data
    ensure_prepared({**defaults, "root": str(root)})
    return root


@pytest.fixture(scope="session")
def data_root(embedded_data_root) -> Path:
    """The embedded corpus as the trainer's tests pass it (FOPE_DATA_ROOT / data.root)."""
    return embedded_data_root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A run_root per test module."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture
def plan_with(data_root, runs):
    """`fope_lm.training.trainer.plan` of the tiny config (helpers.training.TINY) plus overrides: every check, no compute.
    The plan's lock on its run dir is released at once (tests/test_run_dir.py holds one)."""
    from fope_lm.training.trainer import plan

    from helpers.training import TINY, compose_config

    def make(*overrides):
        planned = plan(compose_config([f"run_root={runs}", f"data.root={data_root}", *TINY, *overrides]))
        if planned.lock is not None:  # a plan checks; it does not run: the run dir is free for the next plan or launch
            planned.lock.release()
        return planned

    return make


@pytest.fixture
def isolated_trainer(plan_with):
    """A Trainer built in this process, with what it sets process-wide (signal handlers, log handlers, threads) put back."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    log_handlers, threads = list(logging.getLogger().handlers), torch.get_num_threads()
    from fope_lm.training.trainer import Trainer

    yield lambda *overrides: Trainer(plan_with("train.deterministic=false", "run_name=in-process", "overwrite=true", *overrides))
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    for handler in set(logging.getLogger().handlers) - set(log_handlers):
        logging.getLogger().removeHandler(handler)
    torch.set_num_threads(threads)
