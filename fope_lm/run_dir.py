"""A run directory: the one place that names every file of a run, and how its checkpoints come and go.

    <run_dir>/.lock                        who runs in it: rank 0 holds it for the life of its process (`RunDir.lock`)
    <run_dir>/config.yaml                  the validated config (rank 0, at every start)
    <run_dir>/run_info.json                provenance: git SHA, packages, command, data dir, resume source
    <run_dir>/metrics.jsonl                one JSON record per logged step
    <run_dir>/train.log                    the trainer's log
    <run_dir>/STOP                         touch it to stop the run after its current step (a checkpoint is saved)
    <run_dir>/wandb_id, <run_dir>/wandb/   the wandb run's id (resumes log into the same run) and its files
    <run_dir>/debug/                       fault-injection and digest output (tests)
    <run_dir>/checkpoints/step_NNNNNN/     each checkpoint, published whole (below)
    <run_dir>/eval/step_NNNNNN/<label>/    eval.py's results for each checkpoint (beside checkpoints/, so pruning,
                                           overwrite and resume never delete results)

A checkpoint is written into `step_NNNNNN.tmp`, its files fsynced, a COMPLETE marker added last, and the directory
renamed: a reader never sees a half-written `step_NNNNNN`, and a crash leaves only a `.tmp` behind. A checkpoint that
does not load is moved aside to `step_NNNNNN.corrupt` (never deleted).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from fope_lm.checkpoint import CONFIG_FILE
from fope_lm.errors import CheckpointError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
STAGING_SUFFIX = ".tmp"
CORRUPT_SUFFIX = ".corrupt"
_STEP_DIR = re.compile(r"step_(\d+)")


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    # --- its files ----------------------------------------------------------------------------------------
    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def run_info(self) -> Path:
        return self.path / "run_info.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def train_log(self) -> Path:
        return self.path / "train.log"

    @property
    def stop_file(self) -> Path:
        return self.path / "STOP"

    @property
    def wandb_dir(self) -> Path:
        """Where wandb keeps its files (it makes a wandb/ inside)."""
        return self.path

    @property
    def wandb_id(self) -> Path:
        return self.path / "wandb_id"

    @property
    def debug(self) -> Path:
        return self.path / "debug"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

    def eval_dir(self, checkpoint: str | Path) -> Path:
        """Where evaluations of one of this run's checkpoints go: eval/step_N."""
        return self.path / "eval" / Path(checkpoint).name

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir | None:
        """The run a checkpoint <run_dir>/checkpoints/step_N belongs to, or None for a checkpoint outside a run."""
        checkpoint = Path(checkpoint)
        return cls(checkpoint.parent.parent) if checkpoint.parent.name == "checkpoints" else None

    def owns(self, checkpoint: str | Path) -> bool:
        return Path(checkpoint).resolve().parent == self.checkpoints.resolve()

    def recorded_data_dir(self) -> str | None:
        """The data dir the trainer recorded in run_info.json, or None."""
        return json.loads(self.run_info.read_text()).get("data_dir") if self.run_info.is_file() else None

    def lock(self) -> RunLock:
        """Hold this run dir exclusively for the life of this process (rank 0 of a run; `RunLock`), creating it if
        needed; a CheckpointError naming the holder when another process holds it."""
        return RunLock.acquire(self)

    # --- its checkpoints ----------------------------------------------------------------------------------------
    def list_checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        found = [path for path in self.checkpoints.iterdir() if is_complete(path)] if self.checkpoints.is_dir() else []
        return sorted(found, key=checkpoint_step)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (half-written ones never count), or None."""
        checkpoints = self.list_checkpoints()
        return checkpoints[-1] if checkpoints else None

    def checkpoints_after(self, step: int) -> list[Path]:
        """The complete checkpoints of steps after `step`, oldest first."""
        return [path for path in self.list_checkpoints() if checkpoint_step(path) > step]

    def remove_checkpoints_after(self, step: int) -> list[Path]:
        """Delete the checkpoints (complete or half-written) of steps after `step`: when a run restarts from `step`,
        later ones belong to a trajectory it abandons, and `resume=auto` must never pick them."""
        removed = []
        for path in sorted(self.checkpoints.iterdir()) if self.checkpoints.is_dir() else []:
            match = _STEP_DIR.fullmatch(path.name.removesuffix(STAGING_SUFFIX))
            if match and (int(match.group(1)) > step or path.name.endswith(STAGING_SUFFIX)):
                shutil.rmtree(path)
                removed.append(path)
        return removed

    def prune_checkpoints(self, keep_last: int | None) -> None:
        if keep_last is None:
            return
        for path in self.list_checkpoints()[:-keep_last]:
            shutil.rmtree(path)


def checkpoint_step(directory: str | Path) -> int:
    match = _STEP_DIR.fullmatch(Path(directory).name.removesuffix(STAGING_SUFFIX))
    if match is None:
        raise CheckpointError(f"{directory} is not a step_NNNNNN checkpoint directory")
    return int(match.group(1))


def is_complete(directory: str | Path) -> bool:
    directory = Path(directory)
    return _STEP_DIR.fullmatch(directory.name) is not None and (directory / COMPLETE_MARKER).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint given its own directory, or its run's directory (then the newest complete one). A directory
    that `save_model` wrote outside a run (no marker) counts too: it has weights, if no training state."""
    path = Path(path)
    if is_complete(path):
        return path
    latest = RunDir(path).latest_checkpoint()
    if latest is not None:
        return latest
    if (path / CONFIG_FILE).is_file() and not path.name.endswith(STAGING_SUFFIX):
        return path
    raise CheckpointError(f"{path} is neither a complete checkpoint nor a run directory with one")


def eval_dir(checkpoint: str | Path) -> Path:
    """Where evaluations of a checkpoint go: <run_dir>/eval/step_N for a run's checkpoint, <checkpoint>/eval for a
    checkpoint outside a run."""
    run = RunDir.of_checkpoint(checkpoint)
    return run.eval_dir(checkpoint) if run is not None else Path(checkpoint) / "eval"


def recorded_data_dir(checkpoint: Path) -> tuple[str, Path] | None:
    """(data_dir, the file that names it) for the data a checkpoint was trained on: its metadata's, else its run's
    run_info.json; None when neither records one."""
    config = checkpoint / CONFIG_FILE
    if config.is_file() and (data_dir := json.loads(config.read_text()).get("data_dir")):
        return data_dir, config
    run = RunDir.of_checkpoint(checkpoint)
    if run is not None and (data_dir := run.recorded_data_dir()):
        return data_dir, run.run_info
    return None


def move_aside(checkpoint: Path) -> Path:
    """Rename a checkpoint that does not load to step_N.corrupt (step_N.corrupt.1, ... if taken): kept for a
    post-mortem, never picked by resume=auto, never deleted."""
    target = checkpoint.with_name(checkpoint.name + CORRUPT_SUFFIX)
    n = 0
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"{checkpoint.name}{CORRUPT_SUFFIX}.{n}")
    os.replace(checkpoint, target)
    return target


def staging_dir(final: Path) -> Path:
    return final.with_name(final.name + STAGING_SUFFIX)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_checkpoint(staging: Path, final: Path) -> None:
    """fsync the staged files, add the completion marker, rename staging -> final (atomic), fsync the parent."""
    for path in staging.rglob("*"):
        if path.is_file():
            fsync_path(path)
    (staging / COMPLETE_MARKER).write_text(f"{checkpoint_step(final)}\n")
    fsync_path(staging / COMPLETE_MARKER)
    fsync_path(staging)
    if final.exists():  # an older trajectory's checkpoint of the same step
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_path(final.parent)


# --- one run per run dir -----------------------------------------------------------------------------------------
class RunLock:
    """An exclusive lock on a run dir, held by rank 0 from its plan to its exit, so that a second launch into the same
    dir (a double sbatch, a requeue while the old job still runs) is refused before it sets anything aside or writes.

    `flock` on <run_dir>/.lock: the kernel releases it when the holder dies however it dies, so a dead holder's lock is
    simply taken (and a warning names it). The file holds the holder (host, pid, SLURM job id) for the refusal's
    message, and is never deleted (deleting a lock file races with a process about to lock it).
    Shared filesystems (docs/training.md): NFSv4 (and v3 with lockd) lock across hosts. On a filesystem without
    flock (Lustre mounted without `-o flock`), the lock file alone decides: a holder on this host whose pid is gone
    is taken over; a holder on another host cannot be checked, and is refused with how to clear it.
    """

    def __init__(self, run_dir: RunDir, fd: int | None):
        self.run_dir, self.fd = run_dir, fd

    @classmethod
    def acquire(cls, run_dir: RunDir) -> RunLock:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _read_holder(fd)
                os.close(fd)
                raise CheckpointError(f"{run_dir} is in use by {_describe(holder)}: {_busy_fix(run_dir)}") from None
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            return cls._acquire_without_flock(run_dir, fd)
        previous = _read_holder(fd)
        if previous and previous.get("pid") != os.getpid():  # a clean exit empties the file: this holder died holding it
            log.warning("%s: took over the lock of %s, which no longer holds it", run_dir, _describe(previous))
        lock = cls(run_dir, fd)
        lock._write_holder()
        return lock

    @classmethod
    def _acquire_without_flock(cls, run_dir: RunDir, fd: int) -> RunLock:
        holder = _read_holder(fd)
        if holder and holder.get("pid") != os.getpid():
            same_host = holder.get("host") == socket.gethostname()
            if not same_host or _alive(int(holder.get("pid", 0))):
                os.close(fd)
                raise CheckpointError(
                    f"{run_dir} is in use by {_describe(holder)} (this filesystem has no flock: the lock file decides): "
                    f"{_busy_fix(run_dir)}; if that process is gone, delete {run_dir.lock_file}"
                )
            log.warning("%s: took over the lock file of %s, whose process is gone", run_dir, _describe(holder))
        lock = cls(run_dir, fd)
        lock._write_holder()
        return lock

    def _write_holder(self) -> None:
        assert self.fd is not None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(self.fd)

    def release(self) -> None:
        """A clean end: empty the file and let go (the holder's exit, or dropping this object, lets go too)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            self._close()

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self._close()


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"host": "?", "pid": "?"}


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    since = f", since {holder['started']}" if holder.get("started") else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{job}{since}"


def _busy_fix(run_dir: RunDir) -> str:
    return f"wait for it to finish, stop it (touch {run_dir.stop_file}: it saves and exits), or choose another run_name"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
