"""fope_lm.checkpoint's run layout: where evaluations live, and what pruning touches."""

import signal

from fope_lm.checkpoint import checkpoint_dir, eval_dir, list_checkpoints, prune_checkpoints, publish_checkpoint, staging_dir
from fope_lm.distributed import StopRequests


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
