"""fope_lm.training.metrics: metrics.jsonl written whole and read back after an interrupted write, the MFU peaks, wandb modes."""

import json
import logging

import pytest

from fope_lm.errors import FopeError
from fope_lm.tracking import WandbMode, wandb_mode, wandb_run_id
from fope_lm.training.metrics import MetricsFile, peak_flops, read_metrics


def test_records_are_appended_whole(tmp_path):
    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        metrics.write(step, {"train/loss": 1.0 / step})
    assert read_metrics(metrics.path) == [{"step": s, "train/loss": 1.0 / s} for s in (1, 2, 3)]
    assert metrics.path.read_text().endswith("}\n")


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": 2.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "train/lo')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert "dropped a torn last line" in caplog.text
    MetricsFile(path).keep_until(2)  # what a resume from step 2 does
    assert path.read_text() == "".join(json.dumps({"step": s, "train/loss": 2.0}) + "\n" for s in (1, 2))
    MetricsFile(path).write(3, {"train/loss": 1.5})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_a_broken_line_before_the_last_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n')
    with pytest.raises(FopeError, match=r"metrics.jsonl line 2 is not JSON .*: fix or delete that line$"):
        read_metrics(path)


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A10G") == 125e12 and peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("Tesla V100-SXM2-16GB") == 125e12 and peak_flops("NVIDIA GeForce RTX 4090") == pytest.approx(165.2e12)
    assert peak_flops("NVIDIA RTX A4000") is None and peak_flops("cpu") is None


def test_wandb_is_offline_without_credentials(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(None) == "online" and wandb_mode(WandbMode.disabled) == "disabled"
    assert wandb_run_id(tmp_path / "wandb_id", "fope/60m") == wandb_run_id(tmp_path / "wandb_id", "fope/60m")  # every rank, every requeue
    assert wandb_run_id(tmp_path / "wandb_id", "fope/60m", new=True) != wandb_run_id(tmp_path / "wandb_id", "fope/60m")


def test_a_copied_run_dir_gets_its_own_wandb_run_and_a_moved_one_keeps_it(tmp_path):
    import shutil

    original = tmp_path / "run"
    original.mkdir()
    run_id = wandb_run_id(original / "wandb_id", "fope")
    (original / "wandb_id").write_text(f"{run_id}\n{original.resolve()}\n")  # what start_wandb stores
    assert wandb_run_id(original / "wandb_id", "fope") == run_id  # resumed in place
    shutil.copytree(original, tmp_path / "copy")
    copied = wandb_run_id(tmp_path / "copy" / "wandb_id", "fope")
    assert copied != run_id and copied.startswith("fope-")  # two trajectories, two wandb runs
    shutil.move(original, tmp_path / "moved")
    assert wandb_run_id(tmp_path / "moved" / "wandb_id", "fope") == run_id  # the same run, somewhere else
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "wandb_id").write_text("older-id\n")  # written by older code: no dir recorded, kept
    assert wandb_run_id(tmp_path / "old" / "wandb_id", "fope") == "older-id"
