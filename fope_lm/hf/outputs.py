"""Where scripts/export_hf.py and scripts/import_hf.py write (docs/hf_export.md, "Output directories").

An output directory is never a checkpoint or a run's, nor inside one: a typo such as `export_hf.py RUN
RUN/checkpoints/step_000020` would otherwise replace the checkpoint's weights with differently named tensors. A
non-empty directory is replaced only with `overwrite` (--overwrite), and never when it holds a checkpoint or a run.
Everything is written into a hidden sibling (`.<name>.partial-*`) that is renamed into place once complete: a failed
export or import leaves nothing half-written, and with `overwrite` the old directory goes only after the new one is
whole. Files and directories get the umask's modes (safetensors creates its files mode 600).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fope_lm.checkpoint import CONFIG_FILE, file_mode, umask
from fope_lm.errors import FopeError
from fope_lm.run_dir import RunDir, fsync_path, is_complete

PARTIAL, REPLACED = "partial", "replaced"  # the hidden siblings: the output being written, the one being replaced


class OutputDirError(FopeError):
    """An output directory that would overwrite a checkpoint, a run, a source, or files nobody asked to replace."""


def is_run_dir(directory: Path) -> bool:
    """A run's directory: what the trainer writes first (run_info.json, metrics.jsonl) or its checkpoints/."""
    run = RunDir(directory)
    return run.run_info.is_file() or run.metrics.is_file() or run.checkpoints.is_dir()


def protected_reason(directory: Path, *, itself: bool) -> str | None:
    """Why nothing may be written into `directory` (None when nothing forbids it). `itself`: the output dir itself,
    which also may not be a run dir (a dir inside a run, such as <run>/hf, may be written)."""
    if (directory / CONFIG_FILE).is_file():
        return f"checkpoint {directory} (it holds {CONFIG_FILE})"
    if is_complete(directory):
        return f"checkpoint {directory}"
    if directory.name == RunDir(directory.parent).checkpoints.name and is_run_dir(directory.parent):
        return f"the checkpoints/ of run {directory.parent}"
    if itself and is_run_dir(directory):
        return f"run dir {directory}"
    return None


def check_output_dir(out_dir: str | Path, *, overwrite: bool = False, sources: Iterable[str | Path] = (), example: str = "hf/NAME") -> Path:
    """The resolved output directory, or OutputDirError naming what writing there would destroy. `sources`: the
    directories the output is made from, which it may be neither equal to nor hold; `example`: a good output dir."""
    given = Path(out_dir)
    target = given.expanduser().resolve()  # symlinks and `..` cannot hide a checkpoint
    fix = f"pass a new directory outside every checkpoint and run, e.g. {example}"
    for directory in (target, *target.parents):
        if (reason := protected_reason(directory, itself=directory == target)) is not None:
            where = "is" if directory == target else "lies inside"
            raise OutputDirError(f"output dir {given} {where} {reason}, which would lose its files: {fix}")
    for source in sources:
        source = Path(source).expanduser().resolve()
        if source == target or target in source.parents:
            raise OutputDirError(f"output dir {given} is or holds the source {source}, which would be replaced: {fix}")
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"output dir {given} is a file: pass a directory")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise OutputDirError(f"output dir {given} is not empty: pass --overwrite to replace it (its files are deleted), or a new dir")
        cwd = Path.cwd().resolve()
        if target == cwd or target in cwd.parents or target == Path.home().resolve():
            raise OutputDirError(f"output dir {given} is or holds the current or home directory, which --overwrite would delete: {fix}")
        if (inside := _protected_inside(target)) is not None:
            raise OutputDirError(f"output dir {given} holds {inside}, which --overwrite would delete: {fix}")
    return target


@contextmanager
def staged_output(
    out_dir: str | Path, *, overwrite: bool = False, sources: Iterable[str | Path] = (), example: str = "hf/NAME"
) -> Iterator[Path]:
    """Yield a fresh hidden sibling of `out_dir` to write into; when the block ends without an error, give its files
    the umask's modes, fsync them and rename it to `out_dir` (replacing the old one, which `overwrite` allows). An
    error removes the sibling and leaves `out_dir` as it was."""
    sources = list(sources)
    target = check_output_dir(out_dir, overwrite=overwrite, sources=sources, example=example)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, PARTIAL)
    os.mkdir(staging)  # the umask's mode (tempfile.mkdtemp would make it 700)
    try:
        yield staging
        _settle(staging)
        check_output_dir(out_dir, overwrite=overwrite, sources=sources, example=example)  # nothing appeared there meanwhile
        _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _protected_inside(directory: Path) -> str | None:
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            if (reason := protected_reason(Path(root) / name, itself=True)) is not None:
                return reason
        if CONFIG_FILE in files:
            return f"checkpoint {root} (it holds {CONFIG_FILE})"
    return None


def _sibling(target: Path, what: str) -> Path:
    return target.with_name(f".{target.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}")


def _settle(staging: Path) -> None:
    """The umask's modes on everything written (safetensors makes 600 files), and every file on disk."""
    directory_mode, regular_mode = 0o777 & ~umask(), file_mode()
    for path in sorted(staging.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, directory_mode)
        elif path.is_file():
            os.chmod(path, regular_mode)
            fsync_path(path)
    fsync_path(staging)


def _publish(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an existing non-empty `target` is moved aside first and deleted after."""
    if target.is_dir() and any(target.iterdir()):
        aside = _sibling(target, REPLACED)
        os.rename(target, aside)
        os.rename(staging, target)
        shutil.rmtree(aside)
    else:
        os.replace(staging, target)  # over an empty directory too
    fsync_path(target.parent)
