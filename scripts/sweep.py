"""The paper's experiment grid on SLURM: `python scripts/sweep.py [--submit] [--only c4_60m] [--write-configs] [--cost]`.
See fope_lm/sweep.py (the grid, defined once) and docs/reproduce.md."""

import sys

from fope_lm.sweep import main

if __name__ == "__main__":
    sys.exit(main())
