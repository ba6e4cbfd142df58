"""Tokenize a corpus into flat memmap shards plus metadata.json: the work behind scripts/prepare_data.py.

Sources: the embedded corpus (offline), a Hugging Face Hub dataset (streamed), or local txt/jsonl/parquet files
(loaded with `datasets`, tokenized in `num_proc` worker processes). Documents are joined with an EOS after each.
Preparing is deterministic: the same input, tokenizer and versions give byte-identical shards and fingerprint.
"""

import glob
import hashlib
import itertools
import logging
import os
import platform
import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import datasets
import numpy as np
import tokenizers
import transformers
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

import fope_lm
from fope_lm.data import embedded
from fope_lm.data.config import DataConfig, prepare_command
from fope_lm.data.dataset import TokenData
from fope_lm.data.format import (
    FORMAT_VERSION,
    METADATA_FILE,
    SPLITS,
    TOKENIZER_DIR,
    compute_fingerprint,
    is_prepared,
    read_metadata,
    sha256_file,
    shard_file,
    token_dtype,
    write_metadata,
)
from fope_lm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 2**30  # 2 GiB per uint16 shard
ENCODE_BATCH = 1000  # documents per tokenizer call
_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst", ".lz4"}  # `datasets` decompresses these on the fly


def prepare(
    data_cfg: "Mapping | DataConfig",
    *,
    num_proc: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
) -> Path:
    """Tokenize the source of `data_cfg` into its prepared dir (shards, metadata.json, tokenizer/) and return it.

    An already prepared dir is returned as is unless `overwrite`. The work happens in a hidden sibling dir that is
    renamed into place at the end, so a killed prepare never leaves a dir that looks complete, and concurrent
    prepares of one config (two ranks, say) all end with the same complete dir.
    """
    cfg = DataConfig.from_cfg(data_cfg)
    out_dir = cfg.prepared_dir
    if is_prepared(out_dir) and not overwrite:
        _check_prepared_with(out_dir, cfg)
        logger.info(f"{out_dir} is already prepared (pass --overwrite to rebuild it)")
        return out_dir
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None  # before any download: fail fast
    texts, source = _load_texts(cfg)
    if tokenizer is None:
        tokenizer = embedded.train_embedded_tokenizer(texts["train"][cfg.text_field])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"  # unique per process
    staging.mkdir()
    try:
        metadata = _write_dataset(staging, cfg, texts, tokenizer, source, num_proc, shard_tokens)
        _publish(staging, out_dir, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone once published
    TokenData(out_dir, verify=False).mark_verified()  # its shards were hashed as they were written
    splits = metadata["splits"]
    logger.info(
        f"prepared {out_dir} in {time.perf_counter() - started:.1f}s: "
        f"train {splits['train']['num_tokens']:,} tokens in {len(splits['train']['shards'])} shard(s), "
        f"validation {splits['validation']['num_tokens']:,} tokens, fingerprint {metadata['fingerprint'][:16]}"
    )
    return out_dir


def ensure_prepared(data_cfg: "Mapping | DataConfig") -> Path:
    """The prepared dir of `data_cfg`, for training and eval: the embedded corpus is prepared on first use; any
    other source must have been prepared with scripts/prepare_data.py. Also checks the dir was prepared with this
    config (same tokenizer, caps, ...)."""
    cfg = DataConfig.from_cfg(data_cfg)
    data_dir = cfg.prepared_dir
    if not is_prepared(data_dir):
        if cfg.source != "embedded":
            raise DataError(
                f"data '{cfg.name}' is not prepared ({data_dir} has no {METADATA_FILE}): "
                f"run `{prepare_command(cfg)}`"
            )
        prepare(cfg)
    _check_prepared_with(data_dir, cfg)
    return data_dir


def _check_prepared_with(data_dir: Path, cfg: DataConfig) -> None:
    prepared_with = read_metadata(data_dir)["config"]
    if changed := {key: value for key, value in cfg.to_dict().items() if prepared_with.get(key) != value}:
        differences = ", ".join(f"{key}={prepared_with.get(key)!r} (config: {new!r})" for key, new in changed.items())
        raise DataError(
            f"{data_dir} was prepared with a different config: {differences}; "
            f"run `{prepare_command(cfg, overwrite=True)}` or use another name or root"
        )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer by hub id (a cached copy works offline) or local directory."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:  # unreachable hub, unknown repo, a dir without tokenizer files
        if Path(name_or_path).expanduser().exists() or name_or_path.startswith(("/", ".", "~")):
            raise DataError(
                f"cannot load a tokenizer from {name_or_path} ({_first_line(err)}): pass a dir that holds a "
                "tokenizer.json, such as the tokenizer/ dir of a prepared dataset"
            ) from None
        raise DataError(
            f"cannot load tokenizer {name_or_path!r} from the Hugging Face Hub ({_first_line(err)}): download it "
            f"once where the Hub is reachable (`hf download {name_or_path}`) and run with HF_HUB_OFFLINE=1 "
            "HF_DATASETS_OFFLINE=1 to use that cached copy, or pass a local copy: tokenizer=/path/to/tokenizer_dir"
        ) from None
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {name_or_path!r} has no EOS token, which separates documents: use one that has")
    return tokenizer


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _load_texts(cfg: DataConfig) -> tuple[dict, dict]:
    """The documents of each split (a `datasets` Dataset, or IterableDataset when streaming) and a description."""
    if cfg.source == "embedded":
        documents = embedded.embedded_documents()
        python = platform.python_version()
        source = {
            "description": f"docstrings of the Python {python} standard library and pydoc_data.topics",
            "python": python,
            "num_documents": len(documents),
            "num_bytes": sum(len(document.encode()) for document in documents),
            "validation": f"every {cfg.validation_every}th document",
        }
        return _hold_out(datasets.Dataset.from_dict({cfg.text_field: list(documents)}), cfg.validation_every), source
    if cfg.source == "hf":
        source = {"description": f"{cfg.hf_path} ({cfg.hf_name}) streamed from the Hugging Face Hub"}
        return {split: _stream_from_hub(cfg, split) for split in SPLITS}, source
    texts = _load_files(cfg)
    validation = "the validation files" if "validation" in cfg.paths else f"every {cfg.validation_every}th document"
    return texts, {"description": f"local files {cfg.paths}", "validation": validation}


def _hold_out(documents: datasets.Dataset, every: int) -> dict[str, datasets.Dataset]:
    """Every `every`-th document goes to validation: interleaved, so both splits sample the whole corpus."""
    is_validation = np.arange(len(documents)) % every == every - 1
    return {
        "train": documents.select(np.flatnonzero(~is_validation)),
        "validation": documents.select(np.flatnonzero(is_validation)),
    }


def _stream_from_hub(cfg: DataConfig, split: str) -> datasets.IterableDataset:
    try:
        return datasets.load_dataset(cfg.hf_path, cfg.hf_name, split=split, streaming=True)
    except (ConnectionError, FileNotFoundError) as err:  # unreachable hub, HF_DATASETS_OFFLINE=1, unknown dataset
        raise DataError(
            f"cannot stream {cfg.hf_path} ({cfg.hf_name}, split {split}) from the Hugging Face Hub "
            f"({_first_line(err)}); prepare it where the Hub is reachable, with HF_HUB_OFFLINE and "
            "HF_DATASETS_OFFLINE unset, or download its files and use source=files paths.train=[...] "
            "paths.validation=[...]"
        ) from None


def _load_files(cfg: DataConfig) -> dict[str, datasets.Dataset]:
    builder = _file_builder(cfg.paths)
    options = {"sample_by": "document"} if builder == "text" else {}  # a .txt file is one document, not one per line
    try:
        loaded = datasets.load_dataset(builder, data_files=_match_files(cfg.paths), **options)
    except StopIteration:  # how `datasets` reports json files without a single line
        raise DataError(f"the files of data.paths={cfg.paths} hold no documents") from None
    return dict(loaded) if "validation" in loaded else _hold_out(loaded["train"], cfg.validation_every)


def _match_files(paths: dict[str, list[str]]) -> dict[str, list[str]]:
    """Expand the globs of each split, in sorted order, refusing patterns that match nothing."""
    matched: dict[str, list[str]] = {}
    for split, patterns in paths.items():
        matched[split] = []
        for pattern in patterns:
            if not (files := sorted(glob.glob(os.path.expanduser(pattern), recursive=True))):
                raise DataError(f"no files match paths.{split} entry {pattern!r} (relative to {Path.cwd()})")
            matched[split] += files
    return matched


def _file_builder(paths: dict[str, list[str]]) -> str:
    """The `datasets` builder for the files' extension; one source is all txt, all json(l) or all parquet."""
    builders: set[str | None] = set()
    for path in itertools.chain.from_iterable(paths.values()):
        suffixes = [suffix.lower() for suffix in Path(path).suffixes if suffix.lower() not in _COMPRESSIONS]
        builders.add(_FILE_BUILDERS.get(suffixes[-1] if suffixes else ""))
    if len(builders) != 1 or None in builders:
        raise ConfigError(f"data.paths must be all .txt, all .jsonl/.json or all .parquet files, got {paths}")
    return str(builders.pop())


def _write_dataset(out_dir, cfg, texts, tokenizer, source, num_proc, shard_tokens) -> dict:
    tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)  # training and eval load it from here, offline
    tokenizer_file = out_dir / TOKENIZER_DIR / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise DataError(f"tokenizer {cfg.tokenizer!r} has no tokenizers backend (no tokenizer.json): use a fast one")
    vocab_size = len(tokenizer)
    max_tokens = {"train": cfg.max_tokens_train, "validation": cfg.max_tokens_validation}
    splits = {
        split: _write_split(
            out_dir,
            split,
            _encode(texts[split], tokenizer, cfg.text_field, num_proc),
            vocab_size,
            max_tokens[split],
            shard_tokens,
        )
        for split in SPLITS
    }
    metadata = {
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "source": source,
        "config": cfg.to_dict(),
        "tokenizer": {
            "name": cfg.tokenizer or embedded.TOKENIZER_NAME,
            "path": TOKENIZER_DIR,
            "sha256": sha256_file(tokenizer_file),
            "vocab_size": vocab_size,
            "eos_id": tokenizer.eos_token_id,
            "pad_id": tokenizer.pad_token_id,
        },
        "dtype": token_dtype(vocab_size).name,
        "max_token_id": max(split["max_token_id"] for split in splits.values()),
        "splits": splits,
        "versions": {
            "python": platform.python_version(),
            "fope_lm": fope_lm.__version__,
            "numpy": np.__version__,
            "datasets": datasets.__version__,
            "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__,
        },
    }
    metadata["fingerprint"] = compute_fingerprint(metadata)
    write_metadata(out_dir, metadata)
    return metadata


def _encode(texts, tokenizer: PreTrainedTokenizerBase, text_field: str, num_proc: int):
    """The documents as token ids (column input_ids), each followed by EOS, in the source's order.

    A Dataset is tokenized here, in `num_proc` processes; a streamed IterableDataset lazily, batch by batch.
    """
    eos_id = tokenizer.eos_token_id

    def encode(batch):
        documents = [text for text in batch[text_field] if text]  # an empty document would only add a lone EOS
        encoded = tokenizer(documents, add_special_tokens=False)["input_ids"] if documents else []
        return {"input_ids": [ids + [eos_id] for ids in encoded]}

    columns = texts.column_names  # None for some streamed datasets
    if columns is not None and text_field not in columns:
        raise DataError(f"the documents have no column {text_field!r} (columns: {', '.join(columns)}): set text_field")
    # Streaming reads one shard at a time; the tokenizer's own threads parallelize each batch.
    workers = {} if isinstance(texts, datasets.IterableDataset) else {"num_proc": num_proc if num_proc > 1 else None}
    return texts.map(encode, batched=True, batch_size=ENCODE_BATCH, remove_columns=columns, **workers)


def _write_split(out_dir, split, tokenized, vocab_size, max_tokens, shard_tokens) -> dict:
    """Write the token stream of one split, stopping after `max_tokens` (the last document is cut there)."""
    dtype = token_dtype(vocab_size)
    num_tokens = num_documents = max_token_id = 0
    writer = _ShardWriter(out_dir, split, dtype, shard_tokens)
    with writer, tqdm(total=max_tokens, desc=f"writing {split}", unit="tok", unit_scale=True) as progress:
        for batch in tokenized.iter(batch_size=ENCODE_BATCH):
            documents = batch["input_ids"]
            lengths = np.array([len(ids) for ids in documents], dtype=np.int64)
            tokens = np.fromiter(itertools.chain.from_iterable(documents), dtype=np.int64, count=int(lengths.sum()))
            if max_tokens is not None and num_tokens + tokens.size >= max_tokens:
                room = max_tokens - num_tokens
                lengths = lengths[np.cumsum(lengths) - lengths < room]  # the documents that start before the cap
                tokens = tokens[:room]
            if tokens.size == 0:
                continue
            max_token_id = max(max_token_id, int(tokens.max()))
            if max_token_id >= vocab_size:
                raise DataError(f"the tokenizer produced token id {max_token_id} >= its vocab size {vocab_size}")
            writer.write(tokens.astype(dtype))
            num_tokens += tokens.size
            num_documents += lengths.size
            progress.update(tokens.size)
            if num_tokens == max_tokens:
                break  # stops a streamed download too
    if num_tokens == 0:
        raise DataError(f"the {split} split has no text: check the source's paths / hf_path and text_field")
    return {
        "num_tokens": num_tokens,
        "num_documents": num_documents,
        "max_token_id": max_token_id,
        "shards": writer.shards,
    }


class _ShardWriter:
    """Appends tokens to <split>_00000.bin, <split>_00001.bin, ..., starting a new file every `shard_tokens`."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []  # {"file", "num_tokens", "sha256"} of each finished shard
        self._file: BinaryIO | None = None

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._file is None or self._room == 0:
                self._start_shard()
            head, tokens = tokens[: self._room], tokens[self._room :]
            data = head.tobytes()
            assert self._file is not None  # _start_shard opened it
            self._file.write(data)
            self._digest.update(data)
            self._room -= head.size

    def __enter__(self) -> "_ShardWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self._finish_shard()

    def _start_shard(self) -> None:
        self._finish_shard()
        self._name = shard_file(self.split, len(self.shards))
        self._file = open(self.out_dir / self._name, "wb")
        self._digest = hashlib.sha256()
        self._room = self.shard_tokens

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())  # on disk before the rename that publishes it
        self._file.close()
        self._file = None
        num_tokens = self.shard_tokens - self._room
        self.shards.append({"file": self._name, "num_tokens": num_tokens, "sha256": self._digest.hexdigest()})


def _publish(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Move a finished dataset into place with one rename: a dir with metadata.json is always complete."""
    if overwrite and out_dir.exists():
        retired = staging.with_name(staging.name.replace(".tmp-", ".old-"))
        os.rename(out_dir, retired)
        os.rename(staging, out_dir)
        shutil.rmtree(retired)
        return
    try:
        os.rename(staging, out_dir)  # fails if out_dir exists and is not empty
    except OSError:
        if not is_prepared(out_dir):
            raise DataError(
                f"{out_dir} exists but is not a prepared dataset (no {METADATA_FILE}): remove it or pass --overwrite"
            ) from None
        # Another process (e.g. a second rank) published first; preparing is deterministic, so its data equals ours.
        logger.info(f"{out_dir} was prepared by another process meanwhile; using that copy")
