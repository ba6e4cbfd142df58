"""The paper's experiment grid on SLURM: `python scripts/sweep.py [--submit] [--only c4_60m] [--write-configs] [--cost]`.
See fope_lm/training/sweep.py (the grid, defined once) and docs/reproduce.md."""

import sys

from fope_lm.training.sweep import main

if __name__ == "__main__":
    sys.exit(main())
