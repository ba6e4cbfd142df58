"""The wandb run of a training run or an evaluation: one config section type for both (`WandbConfig`), the mode
(never a login prompt: offline without credentials), and a run id kept in the run dir so that resumes and requeues
log into the same wandb run."""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fope_lm.schema import Choice

log = logging.getLogger(__name__)


class WandbMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class WandbConfig:
    """The `wandb` section of the training config (configs/train.yaml) and of the eval config."""

    enabled: bool = True  # false: no wandb run at all (eval's default)
    project: str = "fope-lm"
    entity: str | None = None
    name: str | None = None  # null: the run's name (training) or label (eval)
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: WandbMode | None = None  # null: WANDB_MODE, else online with credentials, else offline


def has_wandb_credentials() -> bool:
    """An API key in the environment or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(configured: WandbMode | None) -> str:
    """The configured mode, else WANDB_MODE, else online with credentials and offline without (never a login prompt)."""
    if configured is not None:
        return configured.value
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_wandb_credentials() else "offline"


def wandb_run_id(id_file: Path, run_name: str, *, new: bool = False) -> str:
    """The run's wandb id: the one stored in `id_file`, so resumes and requeues log to the same run, else one derived
    from the run name and the file's dir. `new` (a run that replaces an old one in the same dir) adds a random suffix,
    as does a copy of a run dir (the dir the id was stored for still holds it): both copies logging into one wandb
    run would mix two trajectories. A moved run dir keeps its id."""
    here = str(id_file.parent.resolve())
    if id_file.is_file() and not new:
        stored_id, _, stored_dir = id_file.read_text().strip().partition("\n")
        original = Path(stored_dir) / id_file.name if stored_dir else None
        copied = stored_dir not in ("", here) and original is not None and original.is_file() and original.read_text().startswith(stored_id)
        if not copied:
            return stored_id
        log.info("%s is a copy of %s: a new wandb run (the original keeps %s)", here, stored_dir, stored_id)
        new = True
    digest = hashlib.sha1(here.encode()).hexdigest()[:8]
    run_id = re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:48] + "-" + digest
    return run_id + "-" + secrets.token_hex(3) if new else run_id


def start_wandb(section: WandbConfig, *, directory: Path, id_file: Path, run_name: str, config: dict, new_id: bool = False):
    """A wandb run (rank 0 only) writing into `directory`, its id kept in `id_file`, or None when disabled. Online
    failures fall back to offline, never a crash."""
    mode = wandb_mode(section.mode)
    if mode == "disabled":
        return None
    import wandb  # imported here: slow, and not needed with wandb disabled

    run_id = wandb_run_id(id_file, run_name, new=new_id)
    id_file.write_text(f"{run_id}\n{id_file.parent.resolve()}\n")
    kwargs: dict[str, Any] = dict(
        project=section.project,
        entity=section.entity,
        name=section.name or run_name,
        group=section.group,
        tags=list(section.tags),
        config=config,
        id=run_id,
        resume="allow",
        dir=str(directory),
        settings=wandb.Settings(init_timeout=120),
    )
    try:
        return wandb.init(mode=mode, **kwargs)  # type: ignore[arg-type]  # a checked WandbMode value
    except Exception as exc:  # network, auth or service errors: keep training, log locally
        if mode != "online":
            raise
        log.warning("wandb online init failed (%s); logging offline instead (sync later with `wandb sync`)", exc)
        return wandb.init(mode="offline", **kwargs)
