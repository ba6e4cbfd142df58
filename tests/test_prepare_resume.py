"""Resumable, parallel text preparation: a prepare killed after some units continues from them and ends with the
same bytes as an uninterrupted one; 1 and 2 worker processes give the same bytes, for local files and for a
streamed source's shards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from fope_lm.data import prepare
from fope_lm.data.embedded import embedded_documents

from conftest import REPO

UNIT = 60  # documents per unit: the corpus below is 10 units of train


@pytest.fixture(scope="module")
def corpus(embedded_data_root, tmp_path_factory) -> dict:
    """600 + 90 documents of the embedded corpus as jsonl files (3 train files, 1 validation), and its tokenizer."""
    documents = list(embedded_documents())
    raw = tmp_path_factory.mktemp("raw")
    for i in range(3):
        part = documents[200 * i : 200 * (i + 1)]
        (raw / f"train_{i}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in part))
    (raw / "validation.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in documents[600:690]))
    tokenizer = next(embedded_data_root.glob("embedded-py*")) / "tokenizer"
    train = [str(raw / f"train_{i}.jsonl") for i in range(3)]
    return {"train": train, "validation": [str(raw / "validation.jsonl")], "tokenizer": str(tokenizer)}


def config(corpus, root: Path, **overrides) -> dict:
    paths = {"train": corpus["train"], "validation": corpus["validation"]}
    return {"name": "corpus", "source": "files", "paths": paths, "tokenizer": corpus["tokenizer"], "root": str(root), **overrides}


def contents(data_dir: Path) -> dict[str, bytes]:
    """Every file of a prepared dir but this machine's verification marker."""
    return {str(f.relative_to(data_dir)): f.read_bytes() for f in sorted(data_dir.rglob("*")) if f.is_file() and "verified" not in f.parts}


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> dict[str, bytes]:
    return contents(prepare(config(corpus, tmp_path_factory.mktemp("one")), unit_documents=UNIT, shard_tokens=30_000))


def test_two_workers_give_the_same_bytes(corpus, uninterrupted, tmp_path):
    two = contents(prepare(config(corpus, tmp_path), num_proc=2, unit_documents=UNIT, shard_tokens=30_000))
    assert two == uninterrupted
    assert sum(name.startswith("train_") for name in two) > 1  # shards cut across unit boundaries
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work dir or lock left behind


@pytest.mark.slow
def test_a_killed_prepare_resumes_from_its_finished_units(corpus, uninterrupted, tmp_path):
    command = [
        sys.executable, str(REPO / "scripts" / "prepare_data.py"), "local", "name=corpus", f"root={tmp_path}",
        f"paths.train=[{','.join(corpus['train'])}]", f"paths.validation=[{corpus['validation'][0]}]",
        f"tokenizer={corpus['tokenizer']}", "--num-proc", "2", "--unit-documents", str(UNIT), "--shard-tokens", "30000",
    ]  # fmt: skip
    env = {**os.environ, "FOPE_FAULT": "prepare_kill_after_units:4", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "corpus").exists()  # nothing published
    (work,) = [p for p in tmp_path.glob(".corpus.work-*") if p.is_dir()]
    done = sorted(p.name for p in (work / "train").glob("unit_*.json"))
    assert len(done) >= 4 and "unit_00000.json" in done
    env.pop("FOPE_FAULT")
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(done)} of 10 units were tokenized by an earlier run; continuing" in resumed.stderr
    assert contents(tmp_path / "corpus") == uninterrupted
    assert not work.exists()


def test_streamed_shards_are_shared_by_workers_with_the_same_bytes(corpus, tmp_path, monkeypatch):
    """A streamed source (the Hub's C4, replaced by the local files streamed the same way) is split by its own
    shards, here its 3 train files; the cap cuts the stream after the same tokens for any number of workers."""
    load_local = datasets.load_dataset

    def load_from_hub(path, name=None, *, split, streaming):
        return load_local("json", data_files=corpus[split], split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", load_from_hub)
    streamed = {
        "name": "c4", "source": "hf", "hf_path": "allenai/c4", "hf_name": "en", "tokenizer": corpus["tokenizer"],
        "max_tokens_train": 70_000,
    }  # fmt: skip
    one = prepare({**streamed, "root": str(tmp_path / "one")}, shard_tokens=30_000)
    two = prepare({**streamed, "root": str(tmp_path / "two")}, num_proc=2, shard_tokens=30_000)
    assert contents(one) == contents(two)
    assert json.loads((one / "metadata.json").read_text())["splits"]["train"]["num_tokens"] == 70_000
    monkeypatch.undo()
    files = prepare(config(corpus, tmp_path / "files", max_tokens_train=70_000), unit_documents=UNIT, shard_tokens=30_000)
    for split in ("train", "validation"):  # the stream of the files, read as a dataset or streamed, is the same
        assert all(contents(files)[name] == body for name, body in contents(one).items() if name.startswith(split))
