"""fope_lm.checkpoint's run layout: where evaluations live, and what pruning touches."""

from fope_lm.checkpoint import checkpoint_dir, eval_dir, list_checkpoints, prune_checkpoints, publish_checkpoint, staging_dir


def test_eval_results_live_beside_the_checkpoints_and_survive_pruning(tmp_path):
    run_dir = tmp_path / "run"
    for step in (1, 2, 3):
        final = checkpoint_dir(run_dir, step)
        staging_dir(final).mkdir(parents=True)
        publish_checkpoint(staging_dir(final), final)
    results = eval_dir(checkpoint_dir(run_dir, 1)) / "rope" / "results.json"
    assert results == run_dir / "eval" / "step_000001" / "rope" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text("{}")
    prune_checkpoints(run_dir, keep_last=1)
    assert [path.name for path in list_checkpoints(run_dir)] == ["step_000003"]
    assert results.read_text() == "{}"
    assert eval_dir(tmp_path / "exported") == tmp_path / "exported" / "eval"  # a checkpoint outside a run
