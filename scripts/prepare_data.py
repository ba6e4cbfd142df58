"""Tokenize a corpus into memmap shards + metadata.json under <root>/<name> (see docs/data.md).

python scripts/prepare_data.py embedded
python scripts/prepare_data.py c4 root=/scratch/data --num-proc 16      # a killed prepare continues where it stopped
python scripts/prepare_data.py local name=mycorpus paths.train=[corpus/*.jsonl] tokenizer=path/to/tokenizer
"""

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from fope_lm.data import DEFAULT_SHARD_TOKENS, prepare
from fope_lm.data.prepare import UNIT_DOCUMENTS
from fope_lm.errors import ConfigError, FopeError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "data"


def load_config(config: str, overrides: list[str]):
    """A config of configs/data/ by name (or a yaml file by path) with key=value overrides merged in."""
    path = Path(config) if config.endswith((".yaml", ".yml")) else CONFIG_DIR / f"{config}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"no data config {config!r} ({path} does not exist); known: {known}")
    if malformed := [override for override in overrides if "=" not in override]:
        raise ConfigError(f"overrides must look like key=value, got {malformed}")
    return OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a config in configs/data/ (embedded, c4, books, local) or a .yaml path")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. root=/scratch/data")
    parser.add_argument("--num-proc", type=int, default=1, help="tokenizer processes, one unit each (default 1)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="max tokens per shard file")
    parser.add_argument(
        "--unit-documents", type=int, default=UNIT_DOCUMENTS, help="documents per resumable unit of local files (streamed: their shards)"
    )
    parser.add_argument("--overwrite", action="store_true", help="rebuild an already prepared dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        out_dir = prepare(
            cfg, num_proc=args.num_proc, shard_tokens=args.shard_tokens, unit_documents=args.unit_documents, overwrite=args.overwrite
        )
    except FopeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
