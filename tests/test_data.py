"""fope_lm.data: preparing corpora into shards, the seeded resumable training order, the validation reader, and
the one-line errors. CPU only, offline (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1): the embedded corpus is
prepared once per module, local files are tokenized with its tokenizer."""

import ast
import inspect
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from pydoc_data.topics import topics

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from fope_lm.data import (
    DataConfig,
    TokenData,
    TrainBatches,
    ValidationTokens,
    embedded_documents,
    ensure_prepared,
    load_tokenizer,
    prepare,
    train_embedded_tokenizer,
)
from fope_lm.data.dataset import verified_marker
from fope_lm.data.format import VERIFIED_DIR, compute_fingerprint
from fope_lm.errors import ConfigError, DataError, FopeError

from conftest import REPO

PREPARE_SCRIPT = REPO / "scripts" / "prepare_data.py"
MODULE_STARTED = time.perf_counter()
PREPARE_SECONDS: list[float] = []  # filled by the embedded_dir fixture

DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé, emoji 🦊 and CJK 狐狸 survive a byte-level round trip.\n\nEven across blank lines.",
    "",  # empty documents are skipped
    "    leading spaces, trailing newline\n",
    "def f(x):\n    return x ** 2  # code is text too\n",
] + [f"Document number {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(20)]
NONEMPTY = [document for document in DOCUMENTS if document]


def embedded_cfg(root: Path, **overrides):
    """configs/data/embedded.yaml, as Hydra would compose it, with overrides."""
    return OmegaConf.merge(OmegaConf.load(REPO / "configs/data/embedded.yaml"), {"root": str(root), **overrides})


def offline_env() -> dict[str, str]:
    """The environment for a child Python: offline, with this checkout importable."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_python(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def assert_one_line(err: pytest.ExceptionInfo | str, *fragments: str) -> None:
    message = err if isinstance(err, str) else str(err.value)
    assert "\n" not in message.strip(), message
    for fragment in fragments:
        assert fragment in message, message


def split_documents(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """The documents (without their EOS) of a token stream in which each document ends with EOS."""
    assert tokens[-1] == eos_id
    ends = np.flatnonzero(tokens == eos_id)
    return [tokens[start:end] for start, end in zip(np.concatenate([[0], ends[:-1] + 1]), ends, strict=True)]


def read_split(data: TokenData, split: str) -> np.ndarray:
    return data.read(split, np.array([0]), data.num_tokens(split))[0]


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """Keep the Arrow caches that `datasets` writes for local files out of ~/.cache."""
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        patch.setenv("HF_DATASETS_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory) -> Path:
    embedded_documents.cache_clear()  # time the whole prepare, reading the stdlib included
    started = time.perf_counter()
    data_dir = prepare(embedded_cfg(tmp_path_factory.mktemp("data")))
    PREPARE_SECONDS.append(time.perf_counter() - started)
    return data_dir


@pytest.fixture(scope="module")
def embedded(embedded_dir) -> TokenData:
    return TokenData(embedded_dir)


@pytest.fixture
def embedded_copy(embedded_dir, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(embedded_dir, tmp_path / embedded_dir.name))


def write_documents(directory: Path, stem: str, documents: list[str], file_format: str) -> list[str]:
    """Write documents as one jsonl / parquet file, or one .txt file per document; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    if file_format == "jsonl":
        path = directory / f"{stem}.jsonl"
        path.write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(documents)))
        return [str(path)]
    if file_format == "parquet":
        path = directory / f"{stem}.parquet"
        pq.write_table(pa.table({"id": list(range(len(documents))), "text": documents}), path)
        return [str(path)]
    paths = [directory / f"{stem}_{i:03d}.txt" for i in range(len(documents))]
    for path, text in zip(paths, documents, strict=True):
        path.write_text(text)
    return [str(path) for path in paths]


def local_cfg(root: Path, paths, tokenizer: Path, **overrides) -> dict:
    cfg = {"name": "local", "source": "files", "paths": paths, "tokenizer": str(tokenizer), "root": str(root)}
    return cfg | overrides


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, embedded) -> Path:
    """A tiny local corpus (the DOCUMENTS) in shards of 64 tokens, tokenized with the embedded tokenizer."""
    base = tmp_path_factory.mktemp("small")
    paths = {
        "train": write_documents(base / "raw", "train", DOCUMENTS, "jsonl"),
        "validation": write_documents(base / "raw", "validation", NONEMPTY[:3], "jsonl"),
    }
    return prepare(local_cfg(base / "data", paths, embedded.tokenizer_dir), shard_tokens=64)


# --- the embedded corpus ---------------------------------------------------------------------------------------


def test_embedded_corpus_is_long_stdlib_docstrings_then_pydoc_topics():
    documents = embedded_documents()
    assert documents == embedded_documents() and len(set(documents)) == len(documents)
    topic_texts = tuple(dict.fromkeys(topics[name] for name in sorted(topics)))  # "if" and "else" share a text
    assert documents[-len(topic_texts) :] == topic_texts
    assert all(len(document) > 200 for document in documents[: -len(topic_texts)])
    stdlib = Path(sysconfig.get_paths()["stdlib"])

    def module_docstring(relative: str) -> str:
        return inspect.cleandoc(ast.get_docstring(ast.parse((stdlib / relative).read_bytes()), clean=False))

    assert module_docstring("json/__init__.py") in documents
    assert module_docstring("tkinter/__init__.py") not in documents  # an excluded dir
    assert 1_200_000 < sum(len(document.encode()) for document in documents) < 2_000_000


def test_embedded_tokenizer_training_is_deterministic(embedded, tmp_path):
    train_documents = [doc for i, doc in enumerate(embedded_documents()) if i % 10 != 9]
    retrained = train_embedded_tokenizer(train_documents)
    retrained.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (embedded.tokenizer_dir / "tokenizer.json").read_bytes()
    assert (len(retrained), retrained.eos_token_id, retrained.convert_ids_to_tokens(0)) == (8192, 0, "<|endoftext|>")


def test_prepare_embedded_writes_shards_and_metadata(embedded_dir, embedded):
    metadata = embedded.metadata
    assert embedded_dir.name == f"embedded-py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    assert (embedded.vocab_size, embedded.eos_id, metadata["dtype"]) == (8192, 0, "uint16")
    assert metadata["source"]["num_documents"] == len(embedded_documents())
    assert metadata["versions"].keys() >= {"python", "datasets", "tokenizers", "transformers"}
    for split in ("train", "validation"):
        shards = metadata["splits"][split]["shards"]
        assert [shard["file"] for shard in shards] == [f"{split}_00000.bin"]
        assert (embedded_dir / shards[0]["file"]).stat().st_size == 2 * embedded.num_tokens(split)
    assert embedded.fingerprint == compute_fingerprint(metadata)
    embedded.verify()  # re-hashes shards and tokenizer, rescans the max token id
    assert not [path for path in embedded_dir.parent.iterdir() if path.name.startswith(".")]  # no staging left


def test_embedded_splits_decode_to_the_documents_with_every_10th_held_out(embedded):
    tokenizer = AutoTokenizer.from_pretrained(embedded.tokenizer_dir)  # saved next to the shards: offline
    documents = embedded_documents()
    expected = {"train": [d for i, d in enumerate(documents) if i % 10 != 9], "validation": list(documents[9::10])}
    for split, texts in expected.items():
        decoded = tokenizer.batch_decode(split_documents(read_split(embedded, split), embedded.eos_id))
        assert decoded == texts  # an EOS after every document, and nothing else
        assert embedded.metadata["splits"][split]["num_documents"] == len(texts)


@pytest.mark.slow
def test_prepare_script_reproduces_the_embedded_dataset_byte_for_byte(embedded_dir, tmp_path):
    result = run_python(str(PREPARE_SCRIPT), "embedded", f"root={tmp_path}")
    rerun_dir = Path(result.stdout.strip().splitlines()[-1])
    assert rerun_dir == tmp_path / embedded_dir.name
    files = sorted(path.relative_to(embedded_dir) for path in embedded_dir.rglob("*") if path.is_file())
    files = [file for file in files if file.parts[0] != VERIFIED_DIR]  # this machine's record of the files, not data
    assert Path("metadata.json") in files and Path("tokenizer/tokenizer.json") in files
    for file in files:
        assert (rerun_dir / file).read_bytes() == (embedded_dir / file).read_bytes(), file


def test_prepare_returns_an_already_prepared_dir_as_is(embedded_dir, caplog):
    before = (embedded_dir / "metadata.json").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        assert prepare(embedded_cfg(embedded_dir.parent)) == embedded_dir
    assert "already prepared" in caplog.text
    assert (embedded_dir / "metadata.json").stat().st_mtime_ns == before


@pytest.mark.slow
def test_concurrent_first_use_ends_with_one_complete_dir(embedded, tmp_path):
    """Two ranks calling ensure_prepared at once: both prepare, one rename wins, both get the same dir."""
    code = (
        "import sys; from omegaconf import OmegaConf; from fope_lm.data import ensure_prepared; "
        "print(ensure_prepared(OmegaConf.merge(OmegaConf.load('configs/data/embedded.yaml'), {'root': sys.argv[1]})))"
    )
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            cwd=REPO,
            env=offline_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], [err for _, err in outputs]
    assert {out.strip() for out, _ in outputs} == {str(tmp_path / embedded.dir.name)}
    assert [path.name for path in tmp_path.iterdir()] == [embedded.dir.name]  # no staging dirs left behind
    assert TokenData(tmp_path / embedded.dir.name).fingerprint == embedded.fingerprint


# --- local files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", ["jsonl", "parquet", "txt"])
def test_prepare_local_files_is_deterministic_and_decodes_back(embedded, tmp_path, file_format):
    paths = {
        "train": write_documents(tmp_path / "raw", "train", DOCUMENTS, file_format),
        "validation": write_documents(tmp_path / "raw", "validation", NONEMPTY[-4:], file_format),
    }
    first = TokenData(prepare(local_cfg(tmp_path / "a", paths, embedded.tokenizer_dir)))
    second = TokenData(prepare(local_cfg(tmp_path / "b", paths, embedded.tokenizer_dir), num_proc=2))
    assert first.fingerprint == second.fingerprint
    assert (first.dir / "train_00000.bin").read_bytes() == (second.dir / "train_00000.bin").read_bytes()
    assert first.metadata["splits"]["train"]["num_documents"] == len(NONEMPTY)
    tokenizer = AutoTokenizer.from_pretrained(first.tokenizer_dir)
    for split, texts in {"train": NONEMPTY, "validation": NONEMPTY[-4:]}.items():
        decoded = tokenizer.batch_decode(split_documents(read_split(first, split), first.eos_id))
        # jsonl/parquet keep the file's order; txt files (one document each) are read in sorted path order
        assert decoded == texts


def test_local_files_without_validation_hold_out_every_nth_document(embedded, tmp_path):
    paths = write_documents(tmp_path / "raw", "all", NONEMPTY, "jsonl")
    data = TokenData(prepare(local_cfg(tmp_path, paths, embedded.tokenizer_dir, validation_every=4)))
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    validation = tokenizer.batch_decode(split_documents(read_split(data, "validation"), data.eos_id))
    assert validation == NONEMPTY[3::4]


def test_max_tokens_stops_after_the_cap_cutting_the_last_document(embedded, small_dir, tmp_path):
    full = read_split(TokenData(small_dir), "train")
    cap = int(np.flatnonzero(full == embedded.eos_id)[2]) + 5  # 4 tokens into the 4th document
    cfg = {**TokenData(small_dir).metadata["config"], "root": str(tmp_path), "max_tokens_train": cap}
    capped = TokenData(prepare(cfg))
    assert capped.num_tokens("train") == cap
    assert np.array_equal(read_split(capped, "train"), full[:cap])
    assert capped.metadata["splits"]["train"]["num_documents"] == 4


def test_hub_datasets_are_streamed_and_stop_at_the_cap(embedded, small_dir, tmp_path, monkeypatch):
    """The C4 path end to end, with the Hub replaced by the small corpus' jsonl files, streamed the same way."""
    small = TokenData(small_dir)
    files = small.metadata["config"]["paths"]
    load_local = datasets.load_dataset

    def load_from_hub(path, name=None, *, split, streaming):
        assert (path, name, streaming) == ("allenai/c4", "en", True)
        return load_local("json", data_files=files[split], split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", load_from_hub)
    cfg = OmegaConf.merge(
        OmegaConf.load(REPO / "configs/data/c4.yaml"),
        {"root": str(tmp_path), "tokenizer": str(embedded.tokenizer_dir), "max_tokens_train": 300},
    )
    streamed = TokenData(prepare(cfg, shard_tokens=64))
    assert streamed.num_tokens("train") == 300
    assert np.array_equal(read_split(streamed, "train"), read_split(small, "train")[:300])
    assert np.array_equal(read_split(streamed, "validation"), read_split(small, "validation"))


def test_shards_are_capped_and_windows_cross_their_boundaries(small_dir):
    data = TokenData(small_dir)
    shards = data.metadata["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(shard["num_tokens"] == 64 for shard in shards[:-1])
    stream = np.concatenate([np.fromfile(small_dir / shard["file"], dtype=np.uint16) for shard in shards])
    starts = np.array([0, 60, 63, 64, 100, data.num_tokens("train") - 70])
    assert np.array_equal(data.read("train", starts, 70), np.stack([stream[s : s + 70] for s in starts]))
    batches = TrainBatches(data, seq_len=50, global_batch_size=4, seed=0)
    samples = batches.order(0)[:4]
    expected = np.stack([stream[i * 50 : i * 50 + 51] for i in samples]).astype(np.int64)
    assert torch.equal(batches.next_batch(), torch.from_numpy(expected))


# --- training order --------------------------------------------------------------------------------------------

SEQ_LEN, GLOBAL_BATCH = 2048, 8  # 179 samples of the embedded train split: an epoch boundary every ~22 steps


def run_steps(data, steps, world_size, state=None, seed=7):
    """The global batches of `steps` steps, gathered from every rank in rank order; and the final state."""
    ranks = [TrainBatches(data, SEQ_LEN, GLOBAL_BATCH, seed=seed, rank=rank, world_size=world_size) for rank in range(world_size)]
    for rank in ranks:
        if state is not None:
            rank.load_state_dict(json.loads(json.dumps(state)))  # as through a checkpoint
    batches = [torch.cat([rank.next_batch() for rank in ranks]) for _ in range(steps)]
    assert all(rank.state_dict() == ranks[0].state_dict() for rank in ranks)  # the position is global
    return batches, ranks[0].state_dict()


def test_train_batches_are_windows_in_a_seeded_permutation_per_epoch(embedded):
    batches = TrainBatches(embedded, SEQ_LEN, GLOBAL_BATCH, seed=7)
    assert batches.num_samples == (embedded.num_tokens("train") - 1) // SEQ_LEN
    order = batches.order(0)
    assert sorted(order.tolist()) == list(range(batches.num_samples))
    assert not np.array_equal(order, batches.order(1))
    assert not np.array_equal(order, TrainBatches(embedded, SEQ_LEN, GLOBAL_BATCH, seed=8).order(0))
    batch = batches.next_batch()
    assert batch.dtype == torch.long and batch.shape == (GLOBAL_BATCH, SEQ_LEN + 1)
    expected = embedded.read("train", order[:GLOBAL_BATCH] * SEQ_LEN, SEQ_LEN + 1)
    assert torch.equal(batch, torch.from_numpy(expected))
    steps_per_epoch = -(-batches.num_samples // GLOBAL_BATCH)
    for _ in range(steps_per_epoch):
        batches.next_batch()
    assert batches.epoch == 1


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_order_is_the_same_for_any_world_size(embedded, world_size):
    steps = 30  # crosses the first epoch boundary inside a batch (179 is not a multiple of 8)
    single, _ = run_steps(embedded, steps, world_size=1)
    sharded, _ = run_steps(embedded, steps, world_size=world_size)
    assert all(torch.equal(a, b) for a, b in zip(single, sharded, strict=True))


@pytest.mark.parametrize(("saved_world_size", "resumed_world_size"), [(1, 1), (2, 4), (4, 1)])
def test_restoring_a_saved_position_continues_exactly(embedded, saved_world_size, resumed_world_size):
    reference, _ = run_steps(embedded, 30, world_size=1)
    _, state = run_steps(embedded, 20, world_size=saved_world_size)
    assert state["samples_consumed"] == 20 * GLOBAL_BATCH and state["epoch"] == 0
    resumed, _ = run_steps(embedded, 10, world_size=resumed_world_size, state=state)
    assert all(torch.equal(a, b) for a, b in zip(reference[20:], resumed, strict=True))


# --- validation ------------------------------------------------------------------------------------------------


def test_validation_chunks_cover_the_same_prefix_for_every_length(embedded):
    validation = ValidationTokens(embedded, total_tokens=10_000, max_len=1024)
    assert validation.num_tokens == 9 * 1024
    prefix = torch.from_numpy(embedded.read("validation", np.array([0]), 9 * 1024)[0])
    for seq_len in (64, 256, 1024):
        chunks = validation.chunks(seq_len)
        assert chunks.dtype == torch.long and chunks.shape == (9 * 1024 // seq_len, seq_len)
        assert torch.equal(chunks.flatten(), prefix)
    with pytest.raises(ConfigError) as err:
        validation.chunks(100)
    assert_one_line(err, "does not divide max_len=1024")


# --- one-line errors -------------------------------------------------------------------------------------------


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError) as err:
        TokenData(tmp_path / "embedded-py3.11.7")
    assert_one_line(err, "no such directory", "python scripts/prepare_data.py embedded root=")


def test_empty_data_dir(tmp_path):
    with pytest.raises(DataError) as err:
        TokenData(tmp_path)
    assert_one_line(err, "no metadata.json", "python scripts/prepare_data.py")


def test_corrupt_metadata(embedded_copy):
    (embedded_copy / "metadata.json").write_text('{"format_version": 1, ')
    with pytest.raises(DataError) as err:
        TokenData(embedded_copy)
    assert_one_line(err, "not valid JSON", "--overwrite")


def test_missing_shard(embedded_copy):
    (embedded_copy / "validation_00000.bin").unlink()
    with pytest.raises(DataError) as err:
        TokenData(embedded_copy)
    assert_one_line(err, "validation_00000.bin listed in metadata.json is missing", "prepare_data.py embedded root=")
    assert str(err.value).endswith("--overwrite`")


def test_shard_of_the_wrong_size(embedded_copy):
    shard = embedded_copy / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError) as err:
        TokenData(embedded_copy)
    assert_one_line(err, "train_00000.bin has", "bytes, but metadata.json records", "--overwrite")


def test_fingerprint_mismatch(embedded_copy):
    data = TokenData(embedded_copy)
    with pytest.raises(DataError) as err:
        data.check_fingerprint("0" * 64)
    assert_one_line(err, "fingerprint", "expected 0000000000000000")
    shard = embedded_copy / "train_00000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[1000] = (tokens[1000] + 1) % 8192  # same size, different content
    tokens.tofile(shard)
    with pytest.raises(DataError) as err:
        TokenData(embedded_copy).verify()
    assert_one_line(err, "train_00000.bin does not match its sha256", "--overwrite")


def test_shards_are_verified_once_per_machine_and_again_when_changed(embedded_copy, monkeypatch):
    """The first open on a machine re-hashes every shard and records it; later opens only stat the files; a shard
    rewritten with the same size but other bytes (ids beyond the vocab) is caught before any compute."""
    calls, verify = [], TokenData.verify
    monkeypatch.setattr(TokenData, "verify", lambda self: calls.append(self.dir) or verify(self))
    TokenData(embedded_copy)
    assert calls == [embedded_copy]  # the marker copied along names the original's inodes: hashed again
    assert verified_marker(embedded_copy).parent == embedded_copy / VERIFIED_DIR
    TokenData(embedded_copy)
    assert calls == [embedded_copy]  # the marker matches now: no second hashing
    monkeypatch.undo()
    shard = embedded_copy / "train_00000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[1000] = 9000  # beyond the 8192-token vocab, same file size
    tokens.tofile(shard)
    with pytest.raises(DataError) as err:
        TokenData(embedded_copy)
    assert_one_line(err, "train_00000.bin does not match its sha256", "prepare_data.py embedded", "--overwrite")
    # read without verification (verify=False), the out-of-vocabulary id is still a one-line error, never an IndexError
    data = TokenData(embedded_copy, verify=False)
    with pytest.raises(DataError) as err:
        data.read("train", np.array([990]), 64)
    assert_one_line(err, "holds token id 9000, beyond its tokenizer's 8192 ids", "re-prepare")


def test_prepare_records_its_own_verification(embedded_dir, monkeypatch):
    assert verified_marker(embedded_dir).is_file()
    monkeypatch.setattr(TokenData, "verify", lambda self: pytest.fail("re-hashed a dir prepare had just verified"))
    TokenData(embedded_dir)


def test_read_only_data_dir_keeps_its_marker_in_the_cache(embedded_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    marker = verified_marker(embedded_dir)
    assert marker.is_relative_to(tmp_path / "cache" / "fope_lm" / "verified")


def test_token_ids_beyond_the_model_vocab(embedded):
    embedded.check_vocab(8192)
    embedded.check_vocab(8256)  # a model vocab padded past the tokenizer's is fine
    with pytest.raises(DataError) as err:
        embedded.check_vocab(4096)
    assert_one_line(err, "token ids up to 8191", "vocab_size is 4096", "at least 8192")


def test_tokenizer_vocab_larger_than_the_model_vocab(small_dir):
    data = TokenData(small_dir)
    assert data.max_token_id < data.vocab_size - 1  # the tiny corpus uses few of the 8192 tokens
    with pytest.raises(DataError) as err:
        data.check_vocab(data.max_token_id + 1)  # every token of the data fits, the tokenizer does not
    assert_one_line(err, "has 8192 tokens", f"vocab_size is {data.max_token_id + 1}")


def test_sequence_longer_than_the_data(embedded):
    with pytest.raises(DataError) as err:
        TrainBatches(embedded, seq_len=1_000_000, global_batch_size=8)
    assert_one_line(err, "seq_len=1000000", f"has only {embedded.num_tokens('train')}")


def test_global_batch_not_divisible_by_world_size(embedded):
    with pytest.raises(DataError) as err:
        TrainBatches(embedded, seq_len=64, global_batch_size=10, rank=0, world_size=4)
    assert_one_line(err, "global_batch_size=10", "world_size=4")


def test_resuming_with_another_seq_len_or_data(embedded, small_dir):
    state = TrainBatches(embedded, seq_len=64, global_batch_size=8).state_dict()
    with pytest.raises(DataError) as err:
        TrainBatches(embedded, seq_len=128, global_batch_size=8).load_state_dict(state)
    assert_one_line(err, "seq_len=64", "seq_len=128")
    with pytest.raises(DataError) as err:
        TrainBatches(TokenData(small_dir), seq_len=64, global_batch_size=8).load_state_dict(state)
    assert_one_line(err, "fingerprint", "the data changed")


def test_validation_split_shorter_than_max_len(embedded):
    with pytest.raises(DataError) as err:
        ValidationTokens(embedded, total_tokens=10**9, max_len=1_000_000)
    assert_one_line(err, f"has {embedded.num_tokens('validation')} tokens", "max_len=1000000")


def test_unreachable_hub_tokenizer_names_the_env_var_and_the_local_option():
    with pytest.raises(DataError) as err:
        load_tokenizer("fope-lm-test/not-a-cached-tokenizer")
    assert_one_line(err, "fope-lm-test/not-a-cached-tokenizer", "HF_HUB_OFFLINE=1", "tokenizer=/path/to/")


def test_unreachable_hub_dataset_names_the_env_vars_and_the_local_option(embedded, tmp_path):
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs/data/c4.yaml"), {"root": str(tmp_path), "tokenizer": str(embedded.tokenizer_dir)})
    with pytest.raises(DataError) as err:
        prepare(cfg)
    assert_one_line(err, "allenai/c4", "HF_DATASETS_OFFLINE", "source=files")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_failed_prepare_leaves_nothing_behind(embedded, tmp_path):
    paths = {
        "train": write_documents(tmp_path / "raw", "train", NONEMPTY, "jsonl"),
        "validation": write_documents(tmp_path / "raw", "validation", ["", ""], "jsonl"),
    }
    with pytest.raises(DataError) as err:
        prepare(local_cfg(tmp_path / "data", paths, embedded.tokenizer_dir))
    assert_one_line(err, "the validation split has no text")
    assert not list((tmp_path / "data").iterdir())


def test_local_files_that_do_not_exist_or_are_empty(embedded, tmp_path):
    with pytest.raises(DataError) as err:
        prepare(local_cfg(tmp_path, [str(tmp_path / "corpus" / "*.jsonl")], embedded.tokenizer_dir))
    assert_one_line(err, "no files match paths.train entry", "corpus/*.jsonl")
    (tmp_path / "empty.jsonl").touch()
    with pytest.raises(DataError) as err:
        prepare(local_cfg(tmp_path, [str(tmp_path / "empty.jsonl")], embedded.tokenizer_dir))
    assert_one_line(err, "hold no documents")


def test_ensure_prepared_names_the_prepare_command(tmp_path):
    with pytest.raises(DataError) as err:
        ensure_prepared(OmegaConf.merge(OmegaConf.load(REPO / "configs/data/books.yaml"), {"root": str(tmp_path)}))
    assert_one_line(err, "not prepared", f"python scripts/prepare_data.py books root={tmp_path}")


@pytest.mark.parametrize("entry_point", [ensure_prepared, prepare])
def test_data_prepared_with_another_config_is_rejected(embedded_dir, entry_point):
    assert entry_point(embedded_cfg(embedded_dir.parent)) == embedded_dir
    with pytest.raises(DataError) as err:
        entry_point(embedded_cfg(embedded_dir.parent, max_tokens_train=1000))
    assert_one_line(err, "different config", "max_tokens_train=None (config: 1000)", "--overwrite")


def test_invalid_configs(embedded, tmp_path):
    with pytest.raises(ConfigError) as err:
        DataConfig.from_cfg({"name": "x", "source": "embedded", "max_token_train": 5})
    assert_one_line(err, "unknown config key max_token_train", "valid keys:", "max_tokens_train")  # the one validation pattern's message
    with pytest.raises(ConfigError) as err:
        DataConfig.from_cfg({"name": "x", "source": "files"})
    assert_one_line(err, "paths.train")
    with pytest.raises(ConfigError) as err:
        prepare(local_cfg(tmp_path, ["corpus.csv"], embedded.tokenizer_dir))
    assert_one_line(err, "all .txt, all .jsonl/.json or all .parquet")


@pytest.mark.slow
def test_prepare_script_prints_the_one_line_error_and_exits_2(tmp_path):
    result = run_python(str(PREPARE_SCRIPT), "c4", f"root={tmp_path}", "tokenizer=fope-lm-test/not-cached", check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert_one_line(result.stderr, "HF_HUB_OFFLINE=1", "tokenizer=/path/to/")
    assert issubclass(DataError, FopeError)


def test_print_summary(embedded, capsys):
    """Last in the file: the corpus size, and its numbers and wall times printed even under -q (no timing asserts)."""
    source = embedded.metadata["source"]
    assert 1_200_000 < source["num_bytes"] < 2_400_000  # ~1.6 MB of stdlib documentation
    assert embedded.num_tokens("validation") > 0.05 * embedded.num_tokens("train")  # every 10th document
    with capsys.disabled():
        print(
            f"\n[fope_lm.data] embedded corpus: {source['num_bytes']:,} bytes, {source['num_documents']:,} documents; "
            f"tokens: train {embedded.num_tokens('train'):,}, validation {embedded.num_tokens('validation'):,}; "
            f"prepare {PREPARE_SECONDS[0]:.1f}s; this file's tests {time.perf_counter() - MODULE_STARTED:.1f}s"
        )
