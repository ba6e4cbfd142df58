"""fope_lm.metrics: metrics.jsonl written whole and read back after an interrupted write."""

import json
import logging

import pytest

from fope_lm.errors import FopeError
from fope_lm.metrics import MetricsFile, read_metrics


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
