"""fope_lm.checkpoint's run layout: where evaluations live, and what pruning touches."""

from fope_lm.run_dir import RunDir, eval_dir, publish_checkpoint, staging_dir


def test_eval_results_live_beside_the_checkpoints_and_survive_pruning(tmp_path):
    run_dir = tmp_path / "run"
    for step in (1, 2, 3):
        final = RunDir(run_dir).checkpoint(step)
        staging_dir(final).mkdir(parents=True)
        publish_checkpoint(staging_dir(final), final)
    results = eval_dir(RunDir(run_dir).checkpoint(1)) / "rope" / "results.json"
    assert results == run_dir / "eval" / "step_000001" / "rope" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text("{}")
    RunDir(run_dir).prune_checkpoints(1)
    assert [path.name for path in RunDir(run_dir).list_checkpoints()] == ["step_000003"]
    assert results.read_text() == "{}"
    assert eval_dir(tmp_path / "exported") == tmp_path / "exported" / "eval"  # a checkpoint outside a run
