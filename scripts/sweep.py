"""The paper's experiment grid on SLURM: `python scripts/sweep.py [--submit] [--only c4_60m] [--seeds N] [--write-configs] [--cost]`.
Without --submit it prints a bash script that submits the grid (`python scripts/sweep.py > submit.sh && bash submit.sh`).
See fope_lm/training/sweep.py (the grid, defined once) and docs/reproduce.md."""

import sys

from fope_lm.training.sweep import main

if __name__ == "__main__":
    sys.exit(main())
