"""fope_lm.run_dir: one run per run dir. Rank 0 holds an exclusive lock on the run dir from its plan to its exit; a
second holder is refused in one line naming the first (host, pid, SLURM job id); a lock whose holder died is taken
over; on a filesystem without flock the lock file decides (same host: a pid that is gone is taken over)."""

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from fope_lm.errors import CheckpointError
from fope_lm.run_dir import RunDir


def test_a_second_holder_is_refused_in_one_line_naming_the_first(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run_dir = RunDir(tmp_path / "run")
    held = run_dir.lock()
    with pytest.raises(CheckpointError) as error:
        RunDir(tmp_path / "run").lock()
    message = str(error.value)
    assert "\n" not in message and f"is in use by pid {os.getpid()} on {socket.gethostname()}, SLURM job 4242" in message
    assert "touch" in message and "STOP" in message and "another run_name" in message
    held.release()
    assert run_dir.lock_file.read_text() == ""  # a clean end empties it
    RunDir(tmp_path / "run").lock().release()  # and the next one takes it


def test_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    """The kernel releases flock when its holder dies, however it dies: here SIGKILL, after a marker line."""
    run_dir = RunDir(tmp_path / "run")
    script = f"from fope_lm.run_dir import RunDir; lock = RunDir({str(run_dir.path)!r}).lock(); print('held', flush=True); input()"
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(CheckpointError, match=f"is in use by pid {holder.pid}"):
        run_dir.lock()
    holder.kill()
    holder.wait()
    run_dir.lock().release()
    assert f"took over the lock of pid {holder.pid}" in caplog.text and "which no longer holds it" in caplog.text


@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem without flock (Lustre mounted without -o flock): flock fails with ENOLCK."""

    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr("fope_lm.run_dir.fcntl.flock", refuse)


def write_holder(run_dir: RunDir, **holder) -> None:
    run_dir.path.mkdir(parents=True, exist_ok=True)
    run_dir.lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": 0, **holder}))


def test_without_flock_the_lock_file_decides(tmp_path, no_flock, caplog):
    run_dir = RunDir(tmp_path / "run")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    write_holder(run_dir, pid=int(gone))  # this host, a pid that has exited
    run_dir.lock().release()
    assert f"took over the lock file of pid {gone}" in caplog.text

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        write_holder(run_dir, pid=sleeper.pid)  # this host, alive
        with pytest.raises(CheckpointError, match=f"is in use by pid {sleeper.pid}.*has no flock"):
            run_dir.lock()
    finally:
        sleeper.kill()
        sleeper.wait()
    write_holder(run_dir, host="another-node", pid=1)  # cannot be checked from here: refused, with how to clear it
    with pytest.raises(CheckpointError, match=rf"in use by pid 1 on another-node.*delete {run_dir.lock_file}"):
        run_dir.lock()


def test_a_failed_plan_leaves_no_run_dir_behind(plan_with, runs, data_root):
    """The lock is taken once the config is valid; a plan that fails after it (here: init_from names nothing) lets go
    and removes the run dir it made for the lock."""
    with pytest.raises(Exception, match="nosuch"):
        plan_with("+pe=rope", "run_name=fresh", "init_from=/nosuch/checkpoint")
    assert not (runs / "fresh").exists()
    from fope_lm.training.trainer import plan

    from helpers.training import TINY, compose_config

    held = plan(compose_config([f"run_root={runs}", f"data.root={data_root}", *TINY, "+pe=rope", "run_name=fresh"]))
    assert held.lock is not None and json.loads(held.run_dir.lock_file.read_text())["pid"] == os.getpid()
    with pytest.raises(CheckpointError, match="is in use by"):
        plan_with("+pe=rope", "run_name=fresh")
    held.lock.release()
