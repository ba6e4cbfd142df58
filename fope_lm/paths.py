"""Where the configs live: one place for the entry points, the sweep, the DeepSpeed and data config groups.

In a checkout (installed editable, `pip install -e .`, or not installed at all) they are the top-level `configs/` and
`scripts/`, the files users edit. An installed wheel carries copies of both inside the package, as `fope_lm/configs`
and `fope_lm/scripts` (pyproject.toml's package-dir mapping; the same layout relative to each other as in the
checkout), and has no checkout around it: the package's copy is taken when it exists, else the checkout's.
"""

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent  # a checkout (or an editable install): configs/, slurm/ and scripts/ live here


def _shipped_or_checkout(name: str, marker: str) -> Path:
    """The package's copy of the top-level directory `name` (an installed wheel), else the checkout's. `marker`, a file
    it must hold, tells the package's copy from an unrelated directory of that name."""
    shipped = PACKAGE_ROOT / name
    return shipped if (shipped / marker).is_file() else REPO_ROOT / name


CONFIG_DIR = _shipped_or_checkout("configs", "train.yaml")  # absolute: Hydra's config dir for train and eval
SCRIPTS_DIR = _shipped_or_checkout("scripts", "prepare_data.py")  # the scripts whose main(argv) fope_lm.cli runs
