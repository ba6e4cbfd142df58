"""The on-disk format of a prepared dataset, shared by the writer (`prepare`) and the reader (`TokenData`).

A prepared dir holds flat token shards `<split>_00000.bin, ...` (raw uint16 or uint32 ids; the documents of a
split joined with an EOS after each; for source=npy, absolute paths of token files used in place), the tokenizer
that made them in `tokenizer/`, and `metadata.json`, which is written last: a dir with a metadata.json is complete.
`verified/<hostname>.json` records the files a machine has re-hashed against metadata.json (written by the first
reader there, or by prepare itself).
"""

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from fope_lm.data.config import DataConfig, prepare_command
from fope_lm.errors import DataError

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
TOKENIZER_DIR = "tokenizer"
VERIFIED_DIR = "verified"  # <hostname>.json: the files this machine has re-hashed and found whole (TokenData.verify_once)
SPLITS = ("train", "validation")


def shard_file(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids 0 .. vocab_size - 1."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def sha256_file(path: Path, block_bytes: int = 2**23) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def compute_fingerprint(metadata: dict) -> str:
    """sha256 over the tokenizer's hash and every shard's hash, in split and shard order.

    The embedded corpus is a function of the Python version, so that version is part of its fingerprint too.
    """
    digest = hashlib.sha256(metadata["tokenizer"]["sha256"].encode())
    if python := metadata["source"].get("python"):
        digest.update(python.encode())
    for split in SPLITS:
        for shard in metadata["splits"][split]["shards"]:
            digest.update(f"{Path(shard['file']).name}:{shard['sha256']}".encode())  # a file's name, not where it lies
    return digest.hexdigest()


def is_prepared(data_dir: Path) -> bool:
    return (Path(data_dir) / METADATA_FILE).is_file()


def rebuild_command(data_dir: Path, metadata: dict | None = None, overwrite: bool = False) -> str:
    """The command that (re)builds `data_dir`, for error messages: exact when its metadata (the config it was
    prepared with) is at hand, else a guess from the dir's name."""
    data_dir = Path(data_dir)
    if metadata and "config" in metadata:
        return prepare_command(DataConfig.from_cfg({**metadata["config"], "root": str(data_dir.parent)}), overwrite=overwrite)
    name = re.sub(r"-py\d+\.\d+\.\d+$", "", data_dir.name)  # embedded dirs carry the Python version
    return f"python scripts/prepare_data.py {name} root={data_dir.parent}" + (" --overwrite" if overwrite else "")


def read_metadata(data_dir: Path) -> dict:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"no prepared data at {data_dir} (no such directory): run `{rebuild_command(data_dir)}`")
    path = data_dir / METADATA_FILE
    if not path.is_file():
        raise DataError(f"{data_dir} has no {METADATA_FILE} (empty, or not a prepared dataset): run `{rebuild_command(data_dir)}`")
    try:
        metadata = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        fix = rebuild_command(data_dir, overwrite=True)
        raise DataError(f"{path} is not valid JSON ({err}): run `{fix}`") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {metadata.get('format_version')}, this code reads {FORMAT_VERSION}: "
            f"run `{rebuild_command(data_dir, metadata, overwrite=True)}`"
        )
    return metadata


def write_metadata(data_dir: Path, metadata: dict) -> None:
    (Path(data_dir) / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def write_json(path: Path, payload) -> None:
    """Write JSON beside `path` and rename it over: readers see the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
