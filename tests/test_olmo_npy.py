"""source=npy (configs/data/olmo_npy.yaml): OLMo-style headerless token files used in place, and training on them
with OLMo's repetition filter: exact token counts, a metadata-sized prepared dir, train / evaluate / resume, a
changed file refused, and the filtered instances counted as a direct count over the same batches gives."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fope_lm.data import TokenData, TrainBatches, prepare
from fope_lm.data.config import CONFIG_DIR
from fope_lm.data.instance_filter import RepetitionFilter
from fope_lm.errors import ConfigError, DataError
from fope_lm.metrics import read_metrics

from helpers.training import TINY, launch, trajectory

SEQ_LEN = 32  # helpers.training.TINY's


@pytest.fixture(scope="module")
def olmo_files(embedded_data_root, tmp_path_factory) -> dict:
    """The embedded corpus's tokens as OLMo ships its C4: train split over three headerless uint16 files (cut
    mid-document), validation in one; every third training window (of SEQ_LEN + 1 tokens, at multiples of SEQ_LEN)
    starts with 32 copies of one token, which the repetition filter must catch."""
    source = next(embedded_data_root.glob("embedded-py*"))
    files = tmp_path_factory.mktemp("olmo")
    train = np.fromfile(source / "train_00000.bin", dtype=np.uint16)
    for window in range(0, train.size // SEQ_LEN - 1, 3):
        train[window * SEQ_LEN : window * SEQ_LEN + 32] = 7
    (files / "c4").mkdir()
    for i, part in enumerate(np.array_split(train, 3)):
        part.tofile(files / "c4" / f"part-{i:03d}-00000.npy")
    (files / "c4-val").mkdir()
    np.fromfile(source / "validation_00000.bin", dtype=np.uint16).tofile(files / "c4-val" / "part-000-00000.npy")
    return {"dir": files, "train": train, "tokenizer": str(source / "tokenizer"), "root": files / "prepared"}


def npy_config(olmo_files, **overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "olmo_npy.yaml"))
    paths = {"train": [str(olmo_files["dir"] / "c4" / "part-*.npy")], "validation": [str(olmo_files["dir"] / "c4-val" / "*.npy")]}
    return {**cfg, "name": "c4-olmo", "root": str(olmo_files["root"]), "paths": paths, "tokenizer": olmo_files["tokenizer"], **overrides}


def test_token_files_prepare_in_place_with_exact_counts(olmo_files):
    out = prepare(npy_config(olmo_files))
    data = TokenData(out)
    train = olmo_files["train"]
    assert data.num_tokens("train") == train.size and data.eos_id == 0
    assert data.metadata["splits"]["train"]["num_documents"] == int(np.count_nonzero(train == 0))
    assert [Path(s["file"]).name for s in data.metadata["splits"]["train"]["shards"]] == [f"part-{i:03d}-00000.npy" for i in range(3)]
    starts = np.array([0, train.size // 3 - 5, train.size - SEQ_LEN - 1])  # the second window crosses two files
    assert np.array_equal(data.read("train", starts, SEQ_LEN + 1), np.stack([train[s : s + SEQ_LEN + 1] for s in starts]))
    tokens_on_disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and "tokenizer" not in f.parts)
    assert not list(out.glob("*.bin")) and tokens_on_disk < 20_000  # metadata only: the 740 kB of tokens stay where they are
    assert prepare(npy_config(olmo_files)) == out  # prepared already: returned as is


def test_bad_token_files_are_refused_before_any_training(olmo_files, tmp_path):
    def refused(match, **overrides):
        with pytest.raises((DataError, ConfigError), match=match):
            prepare(npy_config(olmo_files, root=str(tmp_path / "prepared"), **overrides))

    def both(name):  # one file as both splits
        return {"train": [str(tmp_path / name)], "validation": [str(tmp_path / name)]}

    np.save(tmp_path / "with_header.npy", np.arange(100, dtype=np.uint16))
    refused(r"has a NumPy header \(np.save\); source=npy reads headerless token files", paths=both("with_header.npy"))
    (tmp_path / "odd.npy").write_bytes(b"\x01\x00\x02")
    refused("3 bytes, not a whole number of uint16 tokens", paths=both("odd.npy"))
    np.array([1, 2, 9000, 0], dtype=np.uint16).tofile(tmp_path / "big.npy")
    refused("holds token id 9000, beyond the 8192 ids of tokenizer", paths=both("big.npy"))
    refused("data.source=npy needs paths.validation too", paths={"train": [str(tmp_path / "big.npy")]})
    refused("data.dtype must be uint16 or uint32", dtype="int32")
    with pytest.raises(ConfigError, match="data.dtype applies to source=npy only"):
        prepare({**npy_config(olmo_files), "source": "files"})


@pytest.mark.slow
def test_train_evaluate_resume_and_filter_on_token_files(olmo_files, runs):
    """Training on the files in place with the repetition filter: the straight run and a resumed one agree bit for bit,
    the filtered count is the direct count over the same batches; a changed file or re-prepared data is refused."""
    data_dir = prepare(npy_config(olmo_files))
    root = olmo_files["root"]
    files = olmo_files["dir"]
    data = [
        "data=olmo_npy", "data.name=c4-olmo", f"data.tokenizer={olmo_files['tokenizer']}",
        f"data.paths.train=[{files / 'c4' / 'part-*.npy'}]", f"data.paths.validation=[{files / 'c4-val' / '*.npy'}]",
    ]  # fmt: skip
    args = [*TINY, *data, "+pe=rope", "train.max_steps=6", "train.save_interval=3", "train.instance_filter=true"]
    launch([*args, "run_name=npy"], data_root=root, runs=runs)
    launch([*args, "run_name=npy-resumed", f"resume={runs / 'npy' / 'checkpoints' / 'step_000003'}"], data_root=root, runs=runs)
    resumed = read_metrics(runs / "npy-resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [4, 5, 6] and trajectory(runs / "npy-resumed") == trajectory(runs / "npy")[3:]
    records = read_metrics(runs / "npy" / "metrics.jsonl")
    assert any("val/loss" in r for r in records)  # evaluated on the validation file at step 6

    batches = TrainBatches(TokenData(data_dir), SEQ_LEN, 8, seed=0, rank=0, world_size=1)
    expected = np.cumsum([int((~RepetitionFilter().keep(batches.next_batch().numpy())).sum()) for _ in range(6)])
    assert [r["train/filtered_instances"] for r in records] == expected.tolist() and expected[-1] > 0
    assert [r["train/filtered_instances"] for r in resumed] == expected.tolist()[3:]  # the count resumes too

    part = olmo_files["dir"] / "c4" / "part-001-00000.npy"
    original = part.read_bytes()
    changed = bytearray(original)
    changed[100:102] = b"\x05\x00"  # one token, same size
    part.write_bytes(bytes(changed))
    try:
        more = [*args, "run_name=npy", "resume=auto", "train.max_steps=9"]
        assert "does not match its sha256" in launch(more, data_root=root, runs=runs, expect_rc="nonzero").output
        prepare(npy_config(olmo_files), overwrite=True)  # re-prepared from the changed file: another fingerprint
        assert "the data changed since the checkpoint was made" in launch(more, data_root=root, runs=runs, expect_rc="nonzero").output
    finally:
        part.write_bytes(original)
        shutil.rmtree(data_dir)
