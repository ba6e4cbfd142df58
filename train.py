"""Train a model: `python train.py +pe=fope model=tiny`, `accelerate launch train.py +pe=fope`. See docs/training.md."""

import sys
from pathlib import Path

import hydra

from fope_lm.errors import FopeError
from fope_lm.training.config import check_command_line
from fope_lm.training.trainer import main

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def hydra_main(cfg) -> None:
    main(cfg)


if __name__ == "__main__":
    try:
        check_command_line(str(CONFIG_DIR), "train", sys.argv[1:])
    except FopeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    hydra_main()
