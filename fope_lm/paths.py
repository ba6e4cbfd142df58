"""Where the configs live: one place for the entry points, the sweep, the DeepSpeed and data config groups."""

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent  # a checkout (or an editable install): configs/, slurm/ and scripts/ live here
CONFIG_DIR = REPO_ROOT / "configs"
