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


def test_optimizer_state_of_older_fire_scalars_fits_the_parameters_again():
    """Checkpoints of older code hold FIRE's c and L multiplier as 0-dim tensors, their AdamW slots too; the
    parameters are (1,) now (DeepSpeed cannot flatten 0-dim ones): the slots take the parameters' shape."""
    import torch

    from fope_lm.nn.model import build_model
    from fope_lm.training.checkpointer import fit_to_parameters

    model = build_model("tiny", pe="fire", vocab_size=256, max_seq_len=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))).loss.backward()
    optimizer.step()
    state = optimizer.state_dict()
    scalars = [i for i, p in enumerate(model.parameters()) if p.shape == (1,)]
    assert scalars  # c and the L multiplier of every layer
    for index in scalars:  # as older code saved them
        state["state"][index] = {k: (v if k == "step" else v.reshape(())) for k, v in state["state"][index].items()}
    optimizer.load_state_dict(fit_to_parameters(state, optimizer))
    optimizer.step()  # would raise "output with shape [] doesn't match the broadcast shape [1]" without the fit
    assert all(optimizer.state[p]["exp_avg"].shape == (1,) for p in model.parameters() if p.shape == (1,))
