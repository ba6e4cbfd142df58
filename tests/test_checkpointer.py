"""fope_lm.training.checkpointer's file checks and notes (its resume behaviour: test_train.py, on real runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fope_lm.errors import CheckpointError
from fope_lm.training.checkpointer import load_torch_file, rng_restore_note


def test_unloadable_checkpoint_files_are_one_line_errors(tmp_path):
    garbage = tmp_path / "optimizer.pt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"cannot load .*optimizer\.pt \(.*\); resume an older checkpoint$") as info:
        load_torch_file(garbage)
    assert "\n" not in str(info.value)


def test_rng_restore_notes():
    assert rng_restore_note(Path("ck"), saved_by=1, world_size=2, rank=0, rng_file=Path("ck/rng_rank0.pt")) == (
        "ck was saved by 1 rank, this run has 2: the random state of each rank is seeded anew"
    )
    missing = rng_restore_note(Path("ck"), saved_by=2, world_size=2, rank=1, rng_file=Path("/nonexistent/rng_rank1.pt"))
    assert missing == "ck has no rng_rank1.pt: the random state of rank 1 is seeded anew"
