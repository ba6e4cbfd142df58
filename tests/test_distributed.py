"""fope_lm.training.distributed: the DeepSpeed JSON the config fills in, and stop requests."""

from __future__ import annotations

import json
import signal

import pytest

from fope_lm.errors import ConfigError
from fope_lm.training.distributed import StopRequests, fill_deepspeed_config

from conftest import REPO


def test_a_stop_file_older_than_the_run_is_removed_not_obeyed(tmp_path, caplog):
    handlers = {signum: signal.getsignal(signum) for signum in StopRequests.SIGNALS}  # StopRequests installs its own
    stop_file = tmp_path / "STOP"
    stop_file.touch()
    started = stop_file.stat().st_mtime + 1
    requests = StopRequests(stop_file, watch_file=True, not_before=started)
    assert not stop_file.exists() and not requests.requested()
    assert "removed the stop file" in caplog.text and "before this run started" in caplog.text
    stop_file.touch()  # one that appears while the run goes on stops it
    assert requests.requested() and requests.reason == f"stop file {stop_file}"
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def test_deepspeed_json_may_not_pin_a_value_the_config_owns(plan_with, tmp_path):
    train = plan_with().config.train
    config = fill_deepspeed_config(REPO / "configs/deepspeed/zero2.json", train, grad_accum=2, world_size=4, precision="bf16")
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 32 and config["gradient_clipping"] == 1.0 and config["bf16"]["enabled"] is True
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps({**json.loads((REPO / "configs/deepspeed/zero2.json").read_text()), "gradient_accumulation_steps": 8}))
    with pytest.raises(ConfigError, match=r"pins gradient_accumulation_steps=8 but .* gives 2"):
        fill_deepspeed_config(pinned, train, grad_accum=2, world_size=4, precision="bf16")
