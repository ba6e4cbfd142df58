"""Tokenize a corpus into flat memmap shards plus metadata.json: the work behind scripts/prepare_data.py.

Sources: the embedded corpus (offline), a Hugging Face Hub dataset (streamed), or local txt/jsonl/parquet files
(loaded with `datasets`, tokenized in `num_proc` worker processes). Documents are joined with an EOS after each.
Preparing is deterministic: the same input, tokenizer and versions give byte-identical shards and fingerprint.
"""

import collections
import fcntl
import functools
import glob
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import platform
import shutil
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers
import transformers
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

import fope_lm
from fope_lm.data import embedded
from fope_lm.data.config import DEFAULT_TOKENIZER, DataConfig, DataSource, OnBadRecord, prepare_command
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
    write_json,
    write_metadata,
)
from fope_lm.errors import ConfigError, DataError, FopeError
from fope_lm.faults import prepare_kill_after_units

logger = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 2**30  # 2 GiB per uint16 shard
ENCODE_BATCH = 1000  # documents per tokenizer call
UNIT_DOCUMENTS = 20_000  # documents per resumable unit of an in-memory source (a streamed one: its own shards)
_SCAN_TOKENS = 2**24  # tokens per chunk when hashing a token file in place (flat memory)
_FILE_KINDS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".lz4": "lz4"}  # read decompressed (fsspec)
_READER_VERSION = 1  # in the name of the files' Arrow copy in the work dir: bump it when _records changes what it yields
_SHOW_SKIPPED = 5  # bad records logged one by one (data.on_bad_record=skip); the rest are only counted


def prepare(
    data_cfg: "Mapping | DataConfig",
    *,
    num_proc: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    unit_documents: int = UNIT_DOCUMENTS,
    overwrite: bool = False,
) -> Path:
    """Tokenize the source of `data_cfg` into its prepared dir (shards, metadata.json, tokenizer/) and return it.

    An already prepared dir is returned as is unless `overwrite`. Text is tokenized unit by unit (a streamed
    source's shards, or `unit_documents` documents at a time) in `num_proc` processes into a work dir named by the
    config, so a killed prepare continues from its finished units; the shards are then assembled in unit order (the
    same bytes for any num_proc) in staging/ inside that work dir, renamed into place at the end, so a killed prepare
    never leaves a dir that looks complete, and the next prepare of the config clears what it left. Concurrent
    prepares of one config (two ranks, say) take turns on a lock and all end with the same complete dir. When the
    input is at fault (a one-line DataError or ConfigError), the work dir and the lock are removed.
    """
    cfg = DataConfig.from_cfg(data_cfg)
    out_dir = cfg.prepared_dir
    if is_prepared(out_dir) and not overwrite:
        _check_prepared_with(out_dir, cfg)
        logger.info(f"{out_dir} is already prepared (pass --overwrite to rebuild it)")
        return out_dir
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None  # before any download: fail fast
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = _work_dir(cfg)
    lock_file = work.with_name(work.name + ".lock")
    with open(lock_file, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one prepare of a config at a time: a second (rank) waits, then finds it done
        if is_prepared(out_dir) and not overwrite:
            logger.info(f"{out_dir} was prepared by another process meanwhile; using that copy")
            _remove_lock(lock, lock_file)
            return out_dir
        staging = work / "staging"  # what a killed prepare left here (up to a whole corpus of shards) is cleared now
        for stale in (staging, work / "retired"):
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            metadata = _build(staging, cfg, tokenizer, num_proc=num_proc, shard_tokens=shard_tokens, unit_documents=unit_documents)
            _publish(staging, out_dir, overwrite)
        except FopeError:  # the input is at fault: a rerun would fail the same way, so nothing is kept to resume
            shutil.rmtree(work, ignore_errors=True)
            _remove_lock(lock, lock_file)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # already gone once published
        shutil.rmtree(work, ignore_errors=True)  # the tokenized units, now in the published shards
        _remove_lock(lock, lock_file)
    TokenData(out_dir, verify=False).mark_verified()  # its shards were hashed as they were written
    splits = metadata["splits"]
    logger.info(
        f"prepared {out_dir} in {time.perf_counter() - started:.1f}s: "
        f"train {splits['train']['num_tokens']:,} tokens in {len(splits['train']['shards'])} shard(s), "
        f"validation {splits['validation']['num_tokens']:,} tokens, fingerprint {metadata['fingerprint'][:16]}"
    )
    return out_dir


def _build(out_dir: Path, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None, **options) -> dict:
    """Write the dataset of `cfg` into `out_dir` (the staging dir) and return its metadata."""
    if cfg.source == DataSource.npy:
        assert tokenizer is not None  # DataConfig sets the default tokenizer for every source but embedded
        return _index_token_files(out_dir, cfg=cfg, tokenizer=tokenizer)
    texts, source = _load_texts(cfg, _work_dir(cfg))
    if tokenizer is None:
        tokenizer = embedded.train_embedded_tokenizer(texts["train"][cfg.text_field])
    return _write_dataset(out_dir, cfg=cfg, texts=texts, tokenizer=tokenizer, source=source, **options)


def _remove_lock(lock, lock_file: Path) -> None:
    """Delete the lock file we hold, unless another process has replaced it. A process waiting on ours holds it open:
    it takes the lock next and finds the dir done (or, after an input error, fails the same way)."""
    try:
        if os.stat(lock_file).st_ino == os.fstat(lock.fileno()).st_ino:
            lock_file.unlink()
    except FileNotFoundError:  # removed by the process that held it before us
        pass


def ensure_prepared(data_cfg: "Mapping | DataConfig") -> Path:
    """The prepared dir of `data_cfg`, for training and eval: the embedded corpus is prepared on first use; any
    other source must have been prepared with scripts/prepare_data.py. Also checks the dir was prepared with this
    config (same tokenizer, caps, ...)."""
    cfg = DataConfig.from_cfg(data_cfg)
    data_dir = cfg.prepared_dir
    if not is_prepared(data_dir):
        if cfg.source != "embedded":
            raise DataError(f"data '{cfg.name}' is not prepared ({data_dir} has no {METADATA_FILE}): run `{prepare_command(cfg)}`")
        prepare(cfg)
    # a run may also read the dir as it was prepared, by its path (`data.dir` takes the dir's own config)
    as_prepared = f"; or use it as it was prepared: data.dir={data_dir.absolute()} (and no other data keys)"
    _check_prepared_with(data_dir, cfg, also="" if cfg.dir is not None else as_prepared)
    return data_dir


def _check_prepared_with(data_dir: Path, cfg: DataConfig, *, also: str = "") -> None:
    """Refuse a dir prepared with other settings than `cfg`'s, naming each difference and the ways out (`also`: more)."""
    if changed := cfg.differences(read_metadata(data_dir)["config"]):
        differences = ", ".join(f"{key}={prepared!r} (config: {configured!r})" for key, (prepared, configured) in changed.items())
        raise DataError(
            f"{data_dir} was prepared with a different config: {differences}; "
            f"run `{prepare_command(cfg, overwrite=True)}` or use another name or root{also}"
        )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer by hub id (a cached copy works offline) or local directory. A tokenizer's own Python
    code (an `auto_map` in its tokenizer_config.json) is never run, and never asked about: transformers would prompt
    "run the custom code? [y/N]" on stdin (a pipe that answers y included) without trust_remote_code=False."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as err:  # unreachable hub, unknown repo, a dir without tokenizer files, custom code
        if "trust_remote_code" in str(err):
            raise DataError(
                f"tokenizer {name_or_path} needs its own Python code (an auto_map in its tokenizer_config.json), which "
                "fope-lm never runs: use a tokenizer that loads without it (a tokenizer.json with a standard tokenizer_class)"
            ) from None
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


def _load_texts(cfg: DataConfig, work: Path) -> tuple[dict, dict]:
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
    texts = _load_files(cfg, work)
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


def _load_files(cfg: DataConfig, work: Path) -> dict[str, datasets.Dataset]:
    """The documents of each split's files, checked record by record (`_file_records`), as an Arrow file in the work
    dir, memory-mapped: written once, read again by a resumed prepare while the files are unchanged (the name holds
    their paths, sizes and mtimes), removed with the work dir."""
    kind, skip = _file_kind(cfg.paths), cfg.on_bad_record == OnBadRecord.skip
    loaded = {}
    for split, files in _match_files(cfg.paths).items():
        stats = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
        key = hashlib.sha256(json.dumps([_READER_VERSION, kind, cfg.text_field, skip, stats]).encode()).hexdigest()[:16]
        path = work / f"documents_{split}_{key}.arrow"
        if not path.is_file():
            _write_documents(path, cfg.text_field, _file_records(files, kind, cfg.text_field, skip))
        loaded[split] = datasets.Dataset.from_file(str(path))
    return loaded if "validation" in loaded else _hold_out(loaded["train"], cfg.validation_every)


def _write_documents(path: Path, text_field: str, texts: Iterator[str | None]) -> None:
    """An Arrow stream file (what `datasets` memory-maps) of one string column, written beside `path` and renamed."""
    schema = pa.schema([(text_field, pa.string())])
    partial = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        while batch := list(itertools.islice(texts, ENCODE_BATCH)):
            writer.write_table(pa.table({text_field: batch}, schema=schema))
    os.replace(partial, path)


def _file_records(files: list[str], kind: str, text_field: str, skip: bool) -> Iterator[str | None]:
    """The text of every document of the files, in order. A record without a string text (the field missing or null,
    a number, bytes that are not UTF-8, a line that is not JSON) is a one-line DataError naming its file and line;
    with `skip` (data.on_bad_record=skip) its text is None, which the tokenizer counts and leaves out."""
    shown = records = 0
    for path in files:
        for location, text, problem in _records(path, kind, text_field):
            records += 1
            if problem is None:
                yield text
                continue
            if not skip:
                raise DataError(f"{location}: {problem} (data.on_bad_record=skip leaves such records out)")
            if shown < _SHOW_SKIPPED:
                shown += 1
                more = "" if shown < _SHOW_SKIPPED else "; not showing more"
                logger.warning("%s: %s; skipped (data.on_bad_record=skip)%s", location, problem, more)
            yield None
    if not records:
        raise DataError(f"the files {', '.join(files)} hold no documents: check data.paths")


def _records(path: str, kind: str, text_field: str):
    """(location, text, problem) for each record of one file: problem is None, or says what is wrong and the fix."""
    if kind == "parquet":
        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}): set data.text_field")
        row = 0
        for batch in table.iter_batches(columns=[text_field]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield f"{path} row {row}", value, _text_problem({text_field: value}, text_field, "row")
        return
    with _open_file(path) as file:
        if kind == "text":  # the whole file is one document
            data = file.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                lines_before = data.count(b"\n", 0, err.start)
                yield f"{path} line {lines_before + 1} (byte {err.start})", None, _utf8_problem(err)
                return
            yield path, text.replace("\r\n", "\n").replace("\r", "\n"), None  # universal newlines, as open() reads text
            return
        offset, first = 0, True
        for number, line in enumerate(file, 1):
            location, offset = f"{path} line {number}", offset + len(line)
            if not line.strip():
                continue
            if first and line.lstrip().startswith(b"["):  # a .json file holding one array of records
                yield from _array_records(path, line + file.read(), text_field)
                return
            first = False
            try:
                record = json.loads(line.rstrip(b"\r\n"))
            except UnicodeDecodeError as err:
                yield f"{location} (byte {offset - len(line) + err.start})", None, _utf8_problem(err)
                continue
            except json.JSONDecodeError as err:
                yield location, None, f"not valid JSON ({err.msg.removesuffix(' at')} at column {err.colno}): fix the line"
                continue
            yield location, record.get(text_field) if isinstance(record, dict) else None, _text_problem(record, text_field, "line")


def _utf8_problem(err: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 ({err.reason}): re-encode the file as UTF-8"


def _array_records(path: str, data: bytes, text_field: str):
    try:
        records = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is neither JSON lines nor one JSON array of records ({_first_line(err)}): fix the file") from None
    for number, record in enumerate(records, 1):
        yield (
            f"{path} record {number}",
            record.get(text_field) if isinstance(record, dict) else None,
            _text_problem(record, text_field, "record"),
        )


def _text_problem(record, text_field: str, unit: str) -> str | None:
    """What is wrong with a record's text (a JSON object or a parquet row), and the fix; None if it is a string."""
    if not isinstance(record, dict):
        return f"not a JSON object but {_json_type(record)}: fix the {unit}"
    if text_field not in record:
        strings = [key for key, value in record.items() if isinstance(value, str)]
        other = f"data.text_field={strings[0]}" if strings else "data.text_field"
        return f'no "{text_field}" field (keys: {", ".join(record)}); set {other} or fix the {unit}'
    if not isinstance(record[text_field], str):
        return f'"{text_field}" is {_json_type(record[text_field])}, not a string: fix the {unit}'
    return None


def _json_type(value) -> str:
    if value is None:
        return "null"
    name = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
    return f"{name} ({json.dumps(value)[:40]})" if isinstance(value, bool | int | float) else name


def _open_file(path: str) -> BinaryIO:
    """A local file in binary mode, decompressed on the fly when its name ends with a compression suffix."""
    compression = _COMPRESSIONS.get(Path(path).suffix.lower())
    if compression is not None and compression not in fsspec.compression.compr:
        package = {"zstd": "zstandard"}.get(compression, compression)
        raise DataError(f"reading {path} needs the {package} package: pip install {package}")
    return fsspec.open(path, "rb", compression=compression).open()


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


def _file_kind(paths: dict[str, list[str]]) -> str:
    """text, json or parquet, by the files' extension: one source is all txt, all json(l) or all parquet."""
    kinds: set[str | None] = set()
    for path in itertools.chain.from_iterable(paths.values()):
        suffixes = [suffix.lower() for suffix in Path(path).suffixes if suffix.lower() not in _COMPRESSIONS]
        kinds.add(_FILE_KINDS.get(suffixes[-1] if suffixes else ""))
    if len(kinds) != 1 or None in kinds:
        raise ConfigError(f"data.paths must be all .txt, all .jsonl/.json or all .parquet files, got {paths}")
    return str(kinds.pop())


def _save_tokenizer(out_dir: Path, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Path:
    """tokenizer/ of a prepared dir, which training and eval load offline; its tokenizer.json (hashed in metadata)."""
    tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)
    tokenizer_file = out_dir / TOKENIZER_DIR / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise DataError(f"tokenizer {cfg.tokenizer!r} has no tokenizers backend (no tokenizer.json): use a fast one")
    return tokenizer_file


def _write_dataset(out_dir, *, cfg, texts, tokenizer, source, num_proc, shard_tokens, unit_documents) -> dict:
    tokenizer_file = _save_tokenizer(out_dir, cfg, tokenizer)
    vocab_size = len(tokenizer)
    max_tokens = {"train": cfg.max_tokens_train, "validation": cfg.max_tokens_validation}
    work = _work_dir(cfg)
    splits = {}
    for split in SPLITS:
        skip_bad = cfg.on_bad_record == OnBadRecord.skip
        units = _Units(texts[split], cfg.text_field, unit_documents, skip_bad=skip_bad, name=f"{split} split of {cfg.name}")
        pieces = _encode_units(work / split, units, tokenizer, token_dtype(vocab_size), max_tokens[split], num_proc)
        splits[split] = _assemble(out_dir, split, pieces, token_dtype(vocab_size), max_tokens[split], shard_tokens, tokenizer.eos_token_id)
        if skip_bad:  # recorded in metadata.json: how many of the documents read were left out
            splits[split]["skipped_records"] = skipped = sum(piece.get("skipped", 0) for piece in pieces)
            logger.warning("%s split: left out %d records without a string %r (data.on_bad_record=skip)", split, skipped, cfg.text_field)
    return _write_metadata(out_dir, cfg, source, tokenizer, tokenizer_file, token_dtype(vocab_size), splits)


def _write_metadata(out_dir, cfg, source, tokenizer, tokenizer_file, dtype, splits) -> dict:
    """metadata.json (written last: a dir with one is complete), with the fingerprint over tokenizer and shards."""
    metadata = {
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "source": source,
        "config": cfg.to_dict(),
        "tokenizer": {
            "name": cfg.tokenizer or embedded.TOKENIZER_NAME,
            "path": TOKENIZER_DIR,
            "sha256": sha256_file(tokenizer_file),
            "vocab_size": len(tokenizer),
            "eos_id": tokenizer.eos_token_id,
            "pad_id": tokenizer.pad_token_id,
        },
        "dtype": np.dtype(dtype).name,
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


def _index_token_files(out_dir: Path, *, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> dict:
    """source=npy: OLMo-style token files (headerless flat memmaps, documents ending with EOS) listed in place. The
    prepared dir holds the tokenizer and metadata.json, whose shards are the files' absolute paths; each file is
    hashed and scanned once, here."""
    tokenizer_file = _save_tokenizer(out_dir, cfg, tokenizer)
    dtype = np.dtype(str(cfg.dtype))
    files = _match_files(cfg.paths)
    splits = {split: _index_split(files[split], dtype, tokenizer, cfg) for split in SPLITS}
    source = {"description": f"token files used in place: {cfg.paths}", "validation": "the validation files"}
    return _write_metadata(out_dir, cfg, source, tokenizer, tokenizer_file, dtype, splits)


def _index_split(paths: list[str], dtype: np.dtype, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> dict:
    shards, num_documents, max_token_id = [], 0, 0
    vocab_size, eos_id = len(tokenizer), tokenizer.eos_token_id
    for name in paths:
        path = Path(name).resolve()
        size = path.stat().st_size
        with open(path, "rb") as file:
            if file.read(6) == b"\x93NUMPY":
                raise DataError(
                    f"{path} has a NumPy header (np.save); source=npy reads headerless token files (OLMo's memmaps): "
                    "rewrite it with np.load(path).tofile(new_path)"
                )
        if size == 0 or size % dtype.itemsize:
            raise DataError(f"{path} has {size} bytes, not a whole number of {dtype.name} tokens: check data.dtype (uint16 or uint32)")
        tokens = np.memmap(path, dtype=dtype, mode="r")
        digest, file_max = hashlib.sha256(), 0
        for start in tqdm(range(0, tokens.size, _SCAN_TOKENS), desc=f"hashing {path.name}", unit="chunk", leave=False):
            chunk = np.asarray(tokens[start : start + _SCAN_TOKENS])
            digest.update(chunk.tobytes())
            file_max = max(file_max, int(chunk.max()))
            num_documents += int(np.count_nonzero(chunk == eos_id))
        if file_max >= vocab_size:
            raise DataError(
                f"{path} holds token id {file_max}, beyond the {vocab_size} ids of tokenizer {cfg.tokenizer!r}: set "
                f"tokenizer= to the one that made these files (OLMo's: {DEFAULT_TOKENIZER}), or data.dtype if it is not {dtype.name}"
            )
        max_token_id = max(max_token_id, file_max)
        shards.append({"file": str(path), "num_tokens": int(tokens.size), "sha256": digest.hexdigest()})
        del tokens  # unmap
    return {
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_documents": num_documents,
        "max_token_id": max_token_id,
        "shards": shards,
    }


def _work_dir(cfg: DataConfig) -> Path:
    """Where the tokenized units of a prepare are kept until it is published: named by the config, so a killed
    prepare of the same config continues from its finished units, and another config never reads them."""
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    return cfg.prepared_dir.parent / f".{cfg.prepared_dir.name}.work-{digest}"


class _Units:
    """A split's documents cut into units, the steps a prepare resumes by and its workers share out: a streamed
    dataset's own shards (its files), or runs of `unit_documents` documents of an in-memory one. The units and
    their order depend on the source alone, never on the number of workers."""

    def __init__(self, texts, text_field: str, unit_documents: int, *, skip_bad: bool = False, name: str = "documents"):
        columns = texts.column_names  # None for some streamed datasets
        if columns is not None and text_field not in columns:
            raise DataError(f"the documents have no column {text_field!r} (columns: {', '.join(columns)}): set text_field")
        self.texts, self.text_field, self.unit_documents = texts, text_field, unit_documents
        self.skip_bad, self.name = skip_bad, name  # data.on_bad_record=skip; what error messages call the documents
        self.streamed = isinstance(texts, datasets.IterableDataset)
        self.count = texts.num_shards if self.streamed else max(1, math.ceil(len(texts) / unit_documents))

    def documents(self, index: int):
        """Batches of the unit's document texts, in order."""
        if self.streamed:
            unit = self.texts.shard(num_shards=self.count, index=index, contiguous=True)
            for batch in unit.iter(batch_size=ENCODE_BATCH):
                yield batch[self.text_field]
            return
        stop = min((index + 1) * self.unit_documents, len(self.texts))
        for start in range(index * self.unit_documents, stop, ENCODE_BATCH):
            yield self.texts[start : min(start + ENCODE_BATCH, stop)][self.text_field]


_JOB: dict = {}  # what forked workers read: the units, the tokenizer, the dtype (inherited, never pickled)


def _encode_unit(work: Path, index: int) -> dict:
    """Tokenize one unit into <work>/unit_<index>.bin (each document followed by EOS) and record it in
    unit_<index>.json, written last: a unit with its json is finished."""
    units, dtype, tokenizer = _JOB["units"], _JOB["dtype"], _JOB["tokenizer"]
    eos_id, vocab_size = tokenizer.eos_token_id, len(tokenizer)
    piece = work / f"unit_{index:05d}.bin"
    partial = piece.with_suffix(f".bin.{os.getpid()}.tmp")
    num_tokens = max_token_id = seen = skipped = 0
    with open(partial, "wb") as file:
        for texts in units.documents(index):
            bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]  # local files: only with skip_bad
            if bad and not units.skip_bad:
                raise DataError(
                    f"record {seen + bad[0] + 1} of unit {index} of the {units.name}: {units.text_field!r} is "
                    f"{_json_type(texts[bad[0]])}, not a string: set data.text_field, or data.on_bad_record=skip to leave such records out"
                )
            seen, skipped = seen + len(texts), skipped + len(bad)
            documents = [text for text in texts if isinstance(text, str) and text]  # an empty one would only add a lone EOS
            if not documents:
                continue
            encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
            tokens = np.fromiter(itertools.chain.from_iterable(ids + [eos_id] for ids in encoded), dtype=np.int64)
            max_token_id = max(max_token_id, int(tokens.max()))
            if max_token_id >= vocab_size:
                raise DataError(f"the tokenizer produced token id {max_token_id} >= its vocab size {vocab_size}")
            file.write(tokens.astype(dtype).tobytes())
            num_tokens += tokens.size
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, piece)
    info = {"file": piece.name, "num_tokens": num_tokens, "skipped": skipped}
    write_json(piece.with_suffix(".json"), info)
    return info


def _encode_units(work: Path, units: _Units, tokenizer, dtype: np.dtype, max_tokens: int | None, num_proc: int) -> list[dict]:
    """Every unit's tokens (or those of the first units, up to the cap) as finished pieces, in unit order: units a
    killed prepare finished are kept, the others are tokenized `num_proc` at a time."""
    work.mkdir(parents=True, exist_ok=True)
    _JOB.update(units=units, tokenizer=tokenizer, dtype=dtype)
    finished = {i: info for i in range(units.count) if (info := _read_json(work / f"unit_{i:05d}.json")) is not None}
    if finished:
        logger.info("%s: %d of %d units were tokenized by an earlier run; continuing", work.name, len(finished), units.count)
    kill_after = prepare_kill_after_units()
    pool = multiprocessing.get_context("fork").Pool(num_proc) if num_proc > 1 and units.count > 1 else None
    pieces: list[dict] = []
    pending: collections.deque = collections.deque()
    next_unit, total = 0, 0
    try:
        with tqdm(total=units.count, desc=f"tokenizing {work.name}", unit="unit", leave=False) as progress:
            while True:
                while next_unit < units.count and len(pending) < max(1, num_proc) and (max_tokens is None or total < max_tokens):
                    if next_unit in finished:
                        pending.append(finished[next_unit])
                    elif pool is not None:
                        pending.append(pool.apply_async(_encode_unit, (work, next_unit)))
                    else:
                        pending.append(functools.partial(_encode_unit, work, next_unit))
                    next_unit += 1
                if not pending or (max_tokens is not None and total >= max_tokens):
                    break
                job = pending.popleft()
                info = job if isinstance(job, dict) else (job() if callable(job) else job.get())
                pieces.append(info)
                total += info["num_tokens"]
                progress.update(1)
                if kill_after is not None and len(pieces) - len(finished) >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # a test's fault: the work dir keeps what was finished
    finally:
        if pool is not None:
            pool.terminate()  # units past the cap: their partial files are never read
            pool.join()
    for name in work.glob("*.tmp"):
        name.unlink()  # left by a killed worker or a unit past the cap
    return [{**info, "path": work / info["file"]} for info in pieces]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _assemble(out_dir, split, pieces, dtype, max_tokens, shard_tokens, eos_id) -> dict:
    """The split's shards from its pieces, in order, stopping after `max_tokens` (the last document cut there):
    the same bytes however the stream was cut into units."""
    num_tokens = num_documents = max_token_id = 0
    writer = _ShardWriter(out_dir, split, dtype, shard_tokens)
    with writer:
        for piece in pieces:
            tokens = np.memmap(piece["path"], dtype=dtype, mode="r") if piece["num_tokens"] else np.empty(0, dtype)
            if max_tokens is not None:
                tokens = tokens[: max_tokens - num_tokens]
            for start in range(0, tokens.size, _SCAN_TOKENS):
                chunk = np.asarray(tokens[start : start + _SCAN_TOKENS])
                writer.write(chunk)
                max_token_id = max(max_token_id, int(chunk.max()))
                num_documents += int(np.count_nonzero(chunk == eos_id))
            num_tokens += tokens.size
            if tokens.size and tokens[-1] != eos_id:  # a document cut by the cap still counts
                num_documents += 1
            del tokens  # unmap
            if num_tokens == max_tokens:
                break
    if num_tokens == 0:
        raise DataError(f"the {split} split has no text: check the source's paths / hf_path and text_field")
    return {"num_tokens": num_tokens, "num_documents": num_documents, "max_token_id": max_token_id, "shards": writer.shards}


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
        self._file = open(self.out_dir / self._name, "wb")  # noqa: SIM115  # open across write() calls; closed by _finish_shard
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
        retired = staging.with_name("retired")  # in the work dir too: a prepare killed here leaves nothing outside it
        os.rename(out_dir, retired)
        os.rename(staging, out_dir)
        shutil.rmtree(retired)
        return
    try:
        os.rename(staging, out_dir)  # fails if out_dir exists and is not empty
    except OSError:
        if not is_prepared(out_dir):
            raise DataError(f"{out_dir} exists but is not a prepared dataset (no {METADATA_FILE}): remove it or pass --overwrite") from None
        # Another process (e.g. a second rank) published first; preparing is deterministic, so its data equals ours.
        logger.info(f"{out_dir} was prepared by another process meanwhile; using that copy")
