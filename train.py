"""Train a model: `python train.py +pe=fope model=tiny`, `accelerate launch train.py +pe=fope`. See docs/training.md.

The same as `fope-lm train +pe=fope model=tiny` (fope_lm/cli.py, which holds the code; configs: fope_lm.paths.CONFIG_DIR).
"""

import sys

from fope_lm.cli import train

if __name__ == "__main__":
    sys.exit(train(sys.argv[1:]))
