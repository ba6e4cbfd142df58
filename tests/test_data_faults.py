"""A shared cluster cannot hurt a run, the data side (downloads: tests/test_download.py): a prepare killed while
writing shards leaves its staging inside its work dir, which the next run clears; a record without a string text
(missing, null, a number, not UTF-8) is a one-line error naming its file and line, with the work dir and lock
removed, or with data.on_bad_record=skip left out, counted and recorded; a tokenizer that asks to run its own code
is refused without a prompt; the number of training instances that bounds the global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fope_lm.data import DataConfig, TokenData, TrainBatches, embedded_documents, load_tokenizer, prepare
from fope_lm.data.prepare import _work_dir
from fope_lm.errors import DataError

from conftest import REPO

PREPARE_SCRIPT = REPO / "scripts" / "prepare_data.py"
UNIT = 60  # documents per unit


@pytest.fixture(scope="module")
def tokenizer(embedded_data_root) -> str:
    return str(next(embedded_data_root.glob("embedded-py*")) / "tokenizer")


def run_prepare(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """scripts/prepare_data.py in a child Python, offline, with this checkout importable."""
    child = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    child["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), child.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(PREPARE_SCRIPT), *args], input=stdin, env=child, capture_output=True, text=True, timeout=300, cwd=REPO
    )


def assert_error_line(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 2 and `error: <message>` as the last line of stderr, with no traceback anywhere."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == f"error: {message}"


def write_jsonl(path: Path, records: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def contents(data_dir: Path) -> dict[str, bytes]:
    """Every file of a prepared dir but this machine's verification marker."""
    return {str(f.relative_to(data_dir)): f.read_bytes() for f in sorted(data_dir.rglob("*")) if f.is_file() and "verified" not in f.parts}


# --- 1. a prepare killed while writing shards -------------------------------------------------------------------


@pytest.mark.slow
def test_a_prepare_killed_while_writing_shards_leaves_nothing_that_a_rerun_does_not_clear(tokenizer, tmp_path):
    """Train is 2 units and validation 3, and the fault kills after 3 newly tokenized units of a split: the train
    shards are written (into staging/ inside the work dir) when validation's third unit ends and the process is
    SIGKILLed. Nothing is staged beside the dataset any more; the rerun clears the stale staging, continues from the
    finished units and publishes the same bytes as an uninterrupted prepare, leaving no hidden dir or lock."""
    documents = list(embedded_documents())
    train = write_jsonl(tmp_path / "raw" / "train.jsonl", [{"text": text} for text in documents[: 2 * UNIT]])
    validation = write_jsonl(tmp_path / "raw" / "validation.jsonl", [{"text": text} for text in documents[2 * UNIT : 5 * UNIT]])
    paths = {"train": [train], "validation": [validation]}
    cfg = {"name": "corpus", "source": "files", "paths": paths, "tokenizer": tokenizer}
    uninterrupted = contents(prepare({**cfg, "root": str(tmp_path / "one")}, unit_documents=UNIT, shard_tokens=20_000))

    root = tmp_path / "killed"
    args = ["local", "name=corpus", f"root={root}", f"paths.train=[{train}]", f"paths.validation=[{validation}]", f"tokenizer={tokenizer}",
            "--unit-documents", str(UNIT), "--shard-tokens", "20000"]  # fmt: skip
    killed = run_prepare(*args, env={"FOPE_FAULT": "prepare_kill_after_units:3"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    (work,) = [p for p in root.glob(".corpus.work-*") if p.is_dir()]
    assert sorted(p.name for p in root.iterdir()) == [work.name, f"{work.name}.lock"]  # no .corpus.tmp-* beside them
    assert [p.name for p in (work / "staging").glob("*.bin")] == ["train_00000.bin"]  # train written, validation not yet
    assert len(list((work / "validation").glob("unit_*.json"))) == 3

    resumed = run_prepare(*args)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert "3 of 3 units were tokenized by an earlier run; continuing" in resumed.stderr
    assert contents(root / "corpus") == uninterrupted
    assert [p.name for p in root.iterdir()] == ["corpus"]


def test_stale_staging_in_the_work_dir_is_cleared_under_the_lock(tokenizer, tmp_path):
    """What a killed prepare left in the work dir (staging/ with shards, or retired/: a dataset an --overwrite moved
    aside before its second rename) is removed by the next prepare of the config before it stages anything."""
    train = write_jsonl(tmp_path / "raw" / "train.jsonl", [{"text": text} for text in list(embedded_documents())[:40]])
    cfg = {"name": "c", "source": "files", "paths": [train], "tokenizer": tokenizer, "root": str(tmp_path / "data")}
    fresh = contents(prepare({**cfg, "root": str(tmp_path / "fresh")}))
    work = _work_dir(DataConfig.from_cfg(cfg))
    for name in ("staging", "retired"):
        (work / name / "tokenizer").mkdir(parents=True)
        (work / name / "train_00007.bin").write_bytes(b"stale")
    assert contents(prepare(cfg)) == fresh
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["c"]


# --- 2. and 3. records without a string text --------------------------------------------------------------------

SKIP_HINT = " (data.on_bad_record=skip leaves such records out)"


def bad_inputs(raw: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (files, the one-line message naming the file and line)."""
    mixed = write_jsonl(raw / "mixed.jsonl", [{("content" if i % 3 == 2 else "text"): f"document {i} " * 20, "id": i} for i in range(60)])
    null = write_jsonl(raw / "null.jsonl", [{"text": "a document"}, {"text": None}])
    number = write_jsonl(raw / "number.jsonl", [{"text": "a document " * 10}, {"text": 5}])
    only_numbers = write_jsonl(raw / "only_numbers.jsonl", [{"text": 5}, {"text": 6}])
    (raw / "latin1.jsonl").write_bytes(b'{"text": "hello world"}\n{"text": "caf\xe9 au lait"}\n')
    (raw / "broken.jsonl").write_bytes(b'{"text": "hello world"}\n{"text": "no end quote}\n')
    (raw / "latin1.txt").write_bytes(b"a text file\nwith caf\xe9 in its second line\n")
    return {
        "missing": (
            [mixed],
            f'{mixed} line 3: no "text" field (keys: content, id); set data.text_field=content or fix the line{SKIP_HINT}',
        ),
        "null": ([null], f'{null} line 2: "text" is null, not a string: fix the line{SKIP_HINT}'),
        "number": ([number], f'{number} line 2: "text" is a number (5), not a string: fix the line{SKIP_HINT}'),
        "only_numbers": ([only_numbers], f'{only_numbers} line 1: "text" is a number (5), not a string: fix the line{SKIP_HINT}'),
        "not_utf8": (
            [str(raw / "latin1.jsonl")],
            f"{raw / 'latin1.jsonl'} line 2 (byte 37): not valid UTF-8 (invalid continuation byte): re-encode the file as UTF-8{SKIP_HINT}",
        ),
        "not_json": (
            [str(raw / "broken.jsonl")],
            f"{raw / 'broken.jsonl'} line 2: not valid JSON (Unterminated string starting at column 10): fix the line{SKIP_HINT}",
        ),
        "txt_not_utf8": (
            [str(raw / "latin1.txt")],
            f"{raw / 'latin1.txt'} line 2 (byte 20): not valid UTF-8 (invalid continuation byte): re-encode the file as UTF-8{SKIP_HINT}",
        ),
    }


@pytest.mark.parametrize("case", ["missing", "null", "number", "only_numbers", "not_utf8", "not_json", "txt_not_utf8"])
def test_a_record_without_a_string_text_names_its_file_and_line(tokenizer, tmp_path, case):
    files, message = bad_inputs(tmp_path / "raw")[case]
    root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        prepare({"name": "x", "source": "files", "paths": files, "tokenizer": tokenizer, "root": str(root)})
    assert str(err.value) == message
    assert not list(root.iterdir())  # the input is at fault: no work dir, no lock


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "only_numbers", "not_utf8", "txt_not_utf8"])
def test_the_prepare_script_prints_the_bad_record_in_one_line(tokenizer, tmp_path, case):
    """What a user sees: `error: <file> line <n>: ...` and exit status 2, no traceback; nothing left under the root."""
    files, message = bad_inputs(tmp_path / "raw")[case]
    root = tmp_path / "data"
    result = run_prepare("local", "name=x", f"root={root}", f"paths.train=[{','.join(files)}]", f"tokenizer={tokenizer}")
    assert_error_line(result, message)
    assert not list(root.iterdir())


def test_a_stale_work_dir_is_removed_when_the_input_is_at_fault(tokenizer, tmp_path):
    """A prepare killed earlier left units; the input has since become bad: the error removes the work dir and lock."""
    documents = list(embedded_documents())[:30]
    corpus = tmp_path / "raw" / "corpus.jsonl"
    cfg = {"name": "x", "source": "files", "paths": [write_jsonl(corpus, [{"text": t} for t in documents])], "tokenizer": tokenizer}
    cfg["root"] = str(tmp_path / "data")
    work = _work_dir(DataConfig.from_cfg(cfg))
    (work / "train").mkdir(parents=True)
    (work / "train" / "unit_00000.json").write_text('{"file": "unit_00000.bin", "num_tokens": 0}')
    (work.with_name(work.name + ".lock")).touch()
    write_jsonl(corpus, [{"text": t} for t in documents] + [{"body": "moved"}])
    with pytest.raises(DataError, match=r"corpus.jsonl line 31: no \"text\" field \(keys: body\)"):
        prepare(cfg)
    assert not list((tmp_path / "data").iterdir())


def test_on_bad_record_skip_leaves_them_out_counted_and_recorded(tokenizer, tmp_path, caplog):
    """1 record in 3 has `content` instead of `text`: with data.on_bad_record=skip the other 40 are prepared, exactly
    as a file of only those 40 would be; the count is logged and in metadata.json, as is the option."""
    raw = tmp_path / "raw"
    records = [{("content" if i % 3 == 2 else "text"): f"document {i} " * 20, "id": i} for i in range(60)]
    validation = write_jsonl(raw / "validation.jsonl", [{"text": "held out"}, {"text": None}, {"text": "held out too"}])
    paths = {"train": [write_jsonl(raw / "mixed.jsonl", records)], "validation": [validation]}
    cfg = {"name": "x", "source": "files", "tokenizer": tokenizer, "on_bad_record": "skip"}
    caplog.set_level("WARNING", logger="fope_lm.data.prepare")
    data = TokenData(prepare({**cfg, "paths": paths, "root": str(tmp_path / "skip")}))
    good = {**paths, "train": [write_jsonl(raw / "good.jsonl", [r for r in records if "text" in r])]}
    clean = TokenData(prepare({**cfg, "paths": good, "root": str(tmp_path / "clean")}))
    train = data.metadata["splits"]["train"]
    assert train["skipped_records"] == 20 and train["num_documents"] == 40
    assert data.metadata["splits"]["validation"]["skipped_records"] == 1
    assert data.metadata["config"]["on_bad_record"] == "skip"
    assert clean.metadata["splits"]["train"]["skipped_records"] == 0
    assert data.fingerprint == clean.fingerprint  # the same shards
    assert (
        f'{paths["train"][0]} line 3: no "text" field (keys: content, id); set data.text_field=content or fix the line; skipped'
        in caplog.text
    )
    assert "train split: left out 20 records without a string 'text' (data.on_bad_record=skip)" in caplog.text


# --- 5. a tokenizer that asks to run its own code ---------------------------------------------------------------


@pytest.fixture
def remote_code_tokenizer(tokenizer, tmp_path) -> tuple[Path, Path]:
    """A copy of the embedded tokenizer whose tokenizer_config.json maps AutoTokenizer to a class in a .py file of the
    dir, which writes a marker file when imported; returns (dir, marker)."""
    directory, marker = Path(shutil.copytree(tokenizer, tmp_path / "remote_tokenizer")), tmp_path / "custom_code_ran"
    (directory / "custom_tokenizer.py").write_text(
        f"from pathlib import Path\nfrom transformers import PreTrainedTokenizerFast\nPath({str(marker)!r}).write_text('ran')\n\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": [None, "custom_tokenizer.CustomTokenizer"]})
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory, marker


def test_a_tokenizer_with_its_own_code_is_refused_without_a_prompt(remote_code_tokenizer, tmp_path):
    """transformers asks "run the custom code? [y/N]" on stdin unless trust_remote_code is given; here stdin is a
    pipe that answers y, so only trust_remote_code=False keeps the code from running."""
    directory, marker = remote_code_tokenizer
    message = (
        f"tokenizer {directory} needs its own Python code (an auto_map in its tokenizer_config.json), which fope-lm never "
        "runs: use a tokenizer that loads without it (a tokenizer.json with a standard tokenizer_class)"
    )
    with pytest.raises(DataError) as err:
        load_tokenizer(str(directory))  # what prepare and eval load tokenizers with
    assert str(err.value) == message
    corpus = write_jsonl(tmp_path / "raw" / "c.jsonl", [{"text": "a document"}])
    env = {"HF_MODULES_CACHE": str(tmp_path / "hf_modules")}  # where transformers would copy the code to run it
    result = run_prepare(
        "local", "name=x", f"root={tmp_path / 'data'}", f"paths.train=[{corpus}]", f"tokenizer={directory}", env=env, stdin="y\n" * 5
    )
    assert_error_line(result, message)
    assert not marker.exists() and not (tmp_path / "hf_modules").exists()


# --- 6. the training instances that bound the global batch --------------------------------------------------------


def test_train_instances_is_what_train_batches_draws_from(tokenizer, tmp_path):
    """stream: (N - 1) // T rows of T + 1 tokens; per_file (npy): each file's size // T, summed (its remainder
    dropped). A global batch above it would repeat samples within a step: the trainer's plan refuses it."""
    rng = np.random.default_rng(0)
    files = tmp_path / "npy"
    files.mkdir()
    for name, size in (("part-000.npy", 1050), ("part-001.npy", 1070), ("val.npy", 500)):
        rng.integers(0, 8000, size, dtype=np.uint16).tofile(files / name)
    paths = {"train": [str(files / "part-*.npy")], "validation": [str(files / "val.npy")]}
    cfg = {"name": "npy", "source": "npy", "paths": paths, "tokenizer": tokenizer, "root": str(tmp_path / "data")}
    per_file = TokenData(prepare(cfg))
    stream = TokenData(prepare({**cfg, "name": "stream", "instances": "stream"}))
    assert per_file.train_instances(100) == 10 + 10 and stream.train_instances(100) == (2120 - 1) // 100 == 21
    assert per_file.train_instances(2000) == 0 and stream.train_instances(2119) == 1 and stream.train_instances(2120) == 0
    for data in (per_file, stream):
        for seq_len in (7, 100, 1000):
            assert TrainBatches(data, seq_len, 2).num_samples == data.train_instances(seq_len)
