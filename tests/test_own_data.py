"""Own data end to end: a corpus prepared once is trained on by its path alone (`data.dir=PATH`: tokenizer, vocab, EOS
and fingerprint from its metadata.json), and eval.py evaluates a checkpoint on the data it was trained on unless told
otherwise (results.json records which data and why); a dir that is not prepared, or a recorded dir that is gone, is a
one-line error that says how to point at the data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from fope_lm.data import DataConfig, TokenData, prepare
from fope_lm.errors import DataError
from fope_lm.evaluation.config import EvalConfig
from fope_lm.evaluation.passkey import FILLER_SENTENCES
from fope_lm.evaluation.runner import run_evaluation
from fope_lm.schema import validated

from conftest import REPO
from helpers.evaluation import passkey_tokenizer
from helpers.training import TINY, launch

# eval settings small enough for the tiny run (L = 32): two lengths, a short prefix, no passkey
EVAL_ARGS = ["perplexity.lengths=[16,32]", "perplexity.tokens_total=512", "passkey.enabled=false", "progress=false", "device=cpu"]


def write_corpus(path: Path, n: int, seed: int) -> Path:
    """n jsonl documents of 10-30 filler sentences in a seeded order."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(FILLER_SENTENCES, size=int(rng.integers(10, 30)))) for _ in range(n)]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def assert_one_line(err, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """Two local corpora prepared with a tokenizer built here, as `scripts/prepare_data.py local name=... tokenizer=DIR`
    does: `mine` (to train on) and `other` (same tokenizer, other validation text). The tokenizer's source dir is
    deleted afterwards: everything after prepare reads the prepared dirs' own tokenizer/."""
    root = tmp_path_factory.mktemp("prepared")
    source = root / "tokenizer-src"
    passkey_tokenizer().save_pretrained(source)
    dirs = {}
    for name, seed in (("mine", 1), ("other", 2)):
        paths = {"train": [str(write_corpus(root / f"{name}-train.jsonl", 60, seed))]}
        paths["validation"] = [str(write_corpus(root / f"{name}-val.jsonl", 20, seed + 10))]
        dirs[name] = prepare({"name": name, "source": "files", "root": str(root), "paths": paths, "tokenizer": str(source)})
    shutil.rmtree(source)
    return dirs


def eval_config(*overrides: str) -> EvalConfig:
    """eval.py's config for these command-line overrides (configs/eval.yaml composed as eval.py does)."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return validated(EvalConfig, compose("eval", overrides=list(overrides)))


# --- data.dir: a prepared dir by its path ---------------------------------------------------------------------
def test_data_dir_is_the_dirs_own_config_whatever_the_group_says(prepared, monkeypatch, tmp_path):
    mine = prepared["mine"]
    recorded = json.loads((mine / "metadata.json").read_text())["config"]
    monkeypatch.chdir(mine.parent)
    for group in ({}, {"name": "embedded", "source": "embedded", "max_tokens_train": 5}, {"name": "local", "source": "files"}):
        cfg = DataConfig.from_cfg({**group, "dir": "mine"})  # relative: made absolute, so a run records a path that lasts
        assert cfg.dir == str(mine) and cfg.prepared_dir == mine and cfg.root == str(mine.parent)
        assert cfg.to_dict() == recorded and cfg.name == "mine" and cfg.source == "files"
    data = TokenData.from_config({"dir": str(mine)})
    assert data.dir == mine and data.fingerprint == TokenData(mine).fingerprint
    assert data.vocab_size == len(passkey_tokenizer()) and data.eos_id == passkey_tokenizer().eos_token_id


def test_a_dir_that_is_not_prepared_is_refused_in_one_line(prepared, tmp_path):
    with pytest.raises(DataError) as err:
        DataConfig.from_cfg({"dir": str(tmp_path / "nowhere")})
    assert_one_line(err, "nowhere: no such directory", "pass the dir that scripts/prepare_data.py wrote")
    with pytest.raises(DataError) as err:
        DataConfig.from_cfg({"dir": str(tmp_path)})
    assert_one_line(err, "is not a prepared dataset: it has no metadata.json and no tokenizer/tokenizer.json")
    copy = tmp_path / "copy"
    shutil.copytree(prepared["mine"], copy)
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(DataError) as err:
        DataConfig.from_cfg({"dir": str(copy)})
    assert_one_line(err, "it has no tokenizer/tokenizer.json")


def test_a_group_that_disagrees_with_the_prepared_dir_points_at_data_dir(prepared):
    """`data=local data.name=mine` without the prepare settings (here: the default hub tokenizer) names the dir's own
    way out, data.dir, besides the rebuild (which would need that tokenizer)."""
    mine = prepared["mine"]
    group = {"name": "mine", "source": "files", "root": str(mine.parent), "paths": {"train": ["x.jsonl"]}}
    with pytest.raises(DataError) as err:
        TokenData.from_config(group)
    assert_one_line(err, "was prepared with a different config: tokenizer=", f"data.dir={mine} (and no other data keys)", "--overwrite")


# --- train and eval on it ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(prepared, tmp_path_factory) -> Path:
    """2 steps of train.py with `data.dir` as the only data key; FOPE_DATA_ROOT is an empty dir, so the default group
    (embedded) cannot be what it trained on."""
    base = tmp_path_factory.mktemp("own")
    (base / "empty-data-root").mkdir()
    args = [*TINY, "+pe=rope", f"data.dir={prepared['mine']}", "train.max_steps=2", "run_name=own"]
    launch(args, data_root=base / "empty-data-root", runs=base / "runs")
    assert not any((base / "empty-data-root").iterdir())  # the embedded group was never prepared
    return base / "runs" / "own"


@pytest.mark.slow
def test_training_on_data_dir_records_the_dir(run_dir, prepared):
    mine = prepared["mine"]
    fingerprint = TokenData(mine).fingerprint
    info = json.loads((run_dir / "run_info.json").read_text())
    assert (info["data_dir"], info["data_fingerprint"]) == (str(mine), fingerprint)
    checkpoint = json.loads((run_dir / "checkpoints" / "step_000002" / "model_config.json").read_text())
    assert (checkpoint["data_dir"], checkpoint["data_fingerprint"]) == (str(mine), fingerprint)
    assert checkpoint["model"]["vocab_size"] >= len(passkey_tokenizer())  # the dir's tokenizer sized the model
    config = (run_dir / "config.yaml").read_text()  # the dir's own config, not the ignored group's (embedded)
    assert f"dir: {mine}" in config and "name: mine" in config and "source: files" in config and "embedded" not in config


@pytest.mark.slow
def test_eval_defaults_to_the_checkpoints_data_and_honours_an_override(run_dir, prepared, tmp_path):
    mine, other = prepared["mine"], prepared["other"]
    # eval.py with no data argument, from another working directory
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "eval.py"), f"checkpoint={run_dir}", f"output_dir={tmp_path / 'own'}", *EVAL_ARGS]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "own" / "results.json").read_text())["data"]
    fingerprint = TokenData(mine).fingerprint
    assert data["source"] == "checkpoint" and data["dir"] == str(mine.resolve()) and data["name"] == "mine"
    assert data["fingerprint"] == data["training_fingerprint"] == fingerprint

    # an explicit data.dir is what eval reads
    results, _ = run_evaluation(eval_config(f"checkpoint={run_dir}", f"data.dir={other}", f"output_dir={tmp_path / 'other'}", *EVAL_ARGS))
    data = results["data"]
    assert data["source"] == "config" and data["dir"] == str(other.resolve()) and data["name"] == "other"
    assert data["fingerprint"] == TokenData(other).fingerprint != fingerprint and data["training_fingerprint"] == fingerprint


@pytest.mark.slow
def test_eval_of_a_checkpoint_whose_data_is_gone_says_how_to_point_at_it(run_dir, tmp_path):
    """A copy of the run whose checkpoint names a data dir that no longer exists: one line naming it and data.dir."""
    shutil.copytree(run_dir / "checkpoints", tmp_path / "run" / "checkpoints")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    metadata = json.loads((checkpoint / "model_config.json").read_text())
    (checkpoint / "model_config.json").write_text(json.dumps({**metadata, "data_dir": str(tmp_path / "gone")}))
    with pytest.raises(DataError) as err:
        run_evaluation(eval_config(f"checkpoint={checkpoint}", *EVAL_ARGS))
    assert_one_line(err, f"{tmp_path / 'gone'}, the data {checkpoint} was trained on", "no longer exists", "data.dir=")
