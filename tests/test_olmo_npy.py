"""source=npy (configs/data/olmo_npy.yaml): OLMo-style headerless token files used in place, and training on them
with OLMo's repetition filter: exact token counts, a metadata-sized prepared dir, OLMo's per-file instances (and the
concatenated stream on request), train / evaluate / resume, a changed file refused, and the filtered instances
counted as a direct count over the same batches gives."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fope_lm.data import DataConfig, TokenData, TrainBatches, ensure_prepared, prepare
from fope_lm.data.config import CONFIG_DIR
from fope_lm.data.instance_filter import RepetitionFilter
from fope_lm.errors import ConfigError, DataError
from fope_lm.training.metrics import read_metrics

from helpers.training import TINY, launch, trajectory

SEQ_LEN = 32  # helpers.training.TINY's


@pytest.fixture(scope="module")
def olmo_files(embedded_data_root, tmp_path_factory) -> dict:
    """The embedded corpus's tokens as OLMo ships its C4: train split over three headerless uint16 files (cut
    mid-document, sizes not multiples of SEQ_LEN), validation in one; every third instance of each file (OLMo's
    SEQ_LEN tokens at multiples of SEQ_LEN in the file) is 32 copies of one token, which the repetition filter must
    catch."""
    source = next(embedded_data_root.glob("embedded-py*"))
    files = tmp_path_factory.mktemp("olmo")
    parts = np.array_split(np.fromfile(source / "train_00000.bin", dtype=np.uint16), 3)
    assert all(part.size % SEQ_LEN for part in parts)
    (files / "c4").mkdir()
    for i, part in enumerate(parts):
        for instance in range(0, part.size // SEQ_LEN, 3):
            part[instance * SEQ_LEN : (instance + 1) * SEQ_LEN] = 7
        part.tofile(files / "c4" / f"part-{i:03d}-00000.npy")
    train = np.concatenate(parts)
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


def olmo_fsl_instances(paths: list[Path], seq_len: int, dtype: str) -> np.ndarray:
    """OLMo's fixed-length instances of token files, re-derived from allenai/OLMo-core
    src/olmo_core/data/numpy_dataset.py @ fa6c501, `NumpyFSLDataset`: `_get_file_size_and_length` gives each file
    file_size // (item_size * sequence_length) instances (line 679), `_sizes_and_offsets` numbers them across the
    files in their order (lines 626-639), `__getitem__` finds the file whose (start, end) holds the index (lines
    584-601) and `_read_chunk_from_array` reads its tokens [i * sequence_length, (i + 1) * sequence_length) (line
    662). allenai/OLMo's `MemMapDataset` (olmo/data/memmap_dataset.py @ 59a53e3: offsets, _get_file_length,
    __getitem__, _read_chunk_from_memmap) cuts the same instances."""
    item_size = np.dtype(dtype).itemsize
    offsets, start_offset = [], 0
    for path in paths:
        length = path.stat().st_size // (item_size * seq_len)
        offsets.append((start_offset, start_offset + length))
        start_offset += length

    def getitem(index: int) -> np.ndarray:
        for i, (offset_start, offset_end) in enumerate(offsets):
            if offset_start <= index < offset_end:
                start_idx = (index - offset_start) * seq_len
                return np.fromfile(paths[i], dtype=dtype)[start_idx : start_idx + seq_len].astype(np.int64)
        raise IndexError(index)

    return np.stack([getitem(index) for index in range(start_offset)])


def token_files(olmo_files, directory: Path, sizes: list[int], dtype: str = "uint16", order=None, **overrides) -> tuple:
    """Token files of random ids (below the embedded tokenizer's 8192) of `sizes` tokens, prepared as source=npy with
    paths.train listing them in `order` (default: as written); returns the TokenData and the files in that order."""
    rng = np.random.default_rng(sum(sizes))
    paths = [directory / f"part-{i:03d}-00000.npy" for i in range(len(sizes))]
    for path, size in zip(paths, sizes, strict=True):
        rng.integers(0, 8192, size).astype(dtype).tofile(path)
    listed = [paths[i] for i in order] if order else paths
    cfg = npy_config(olmo_files, root=str(directory / "prepared"), dtype=dtype, **overrides)
    cfg["paths"] = {"train": [str(path) for path in listed], "validation": [str(paths[0])]}
    return TokenData(prepare(cfg)), listed


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_per_file_instances_are_olmos(olmo_files, tmp_path, dtype):
    """source=npy's default: each file cut on its own into seq_len-token instances, numbered across the files in the
    order the config lists them; a row is the instance (the model's inputs) and NO_TARGET (-100): no target after the
    instance's last token, as in OLMo's loss. The seeded order over them is the stream mode's."""
    seq_len, batch = 16, 4
    sizes = [100, 9, 64, 77, 50]  # remainders 4, 9 (no instance at all), 0, 13, 2
    data, listed = token_files(olmo_files, tmp_path, sizes, dtype, order=[3, 0, 1, 2, 4])  # the config's order, not the names'
    olmo = olmo_fsl_instances(listed, seq_len, dtype)
    assert data.instances == "per_file" and len(olmo) == sum(size // seq_len for size in sizes) == 17
    batches = TrainBatches(data, seq_len, batch, seed=3)
    rows = batches.rows(np.arange(batches.num_samples))
    assert np.array_equal(rows[:, :-1], olmo) and (rows[:, -1] == -100).all()
    assert np.array_equal(RepetitionFilter().keep(rows), RepetitionFilter().keep_instances(olmo))
    order = np.concatenate([batches.order(0), batches.order(1)])  # epoch 0, then epoch 1's permutation
    for step in range(6):  # the fifth step straddles the epochs
        assert np.array_equal(batches.next_batch().numpy()[:, :-1], olmo[order[step * batch : (step + 1) * batch]])


def test_stream_instances_on_request(olmo_files, tmp_path):
    """data.instances=stream: the files as one stream, a row of seq_len + 1 tokens every seq_len; from the first
    file with a remainder on, its rows cross files and are shifted against OLMo's instances."""
    seq_len = 16
    data, paths = token_files(olmo_files, tmp_path, [100, 77, 50], instances="stream")
    stream = np.concatenate([np.fromfile(path, dtype=np.uint16) for path in paths]).astype(np.int64)
    batches = TrainBatches(data, seq_len, 4)
    assert data.instances == "stream" and batches.num_samples == (stream.size - 1) // seq_len
    rows = batches.rows(np.arange(batches.num_samples))
    assert np.array_equal(rows, np.stack([stream[i * seq_len : (i + 1) * seq_len + 1] for i in range(batches.num_samples)]))
    olmo = olmo_fsl_instances(paths, seq_len, "uint16")
    assert np.array_equal(rows[:6, :-1], olmo[:6]) and not np.array_equal(rows[6, :-1], olmo[6])


def test_per_file_position_resumes_exactly_at_any_world_size(olmo_files, tmp_path):
    seq_len, batch = 16, 4
    data, _ = token_files(olmo_files, tmp_path, [300, 41, 170])
    straight = TrainBatches(data, seq_len, batch, seed=5)
    for _ in range(3):
        straight.next_batch()
    state = json.loads(json.dumps(straight.state_dict()))  # as through a checkpoint
    assert state["instances"] == "per_file" and straight.num_samples == 18 + 2 + 10
    ranks = [TrainBatches(data, seq_len, batch, seed=5, rank=rank, world_size=2) for rank in range(2)]
    for rank in ranks:
        rank.load_state_dict(state)
    for _ in range(12):  # through two epochs' ends
        expected = straight.next_batch()
        assert torch.equal(torch.cat([rank.next_batch() for rank in ranks]), expected)
    refused = r"^the saved data position is for data.instances=stream, but this run uses data.instances=per_file: resume with"
    for saved in ({**state, "instances": "stream"}, {k: v for k, v in state.items() if k != "instances"}):  # older code's
        with pytest.raises(DataError, match=refused):
            TrainBatches(data, seq_len, batch, seed=5).load_state_dict(saved)


def test_instances_config(olmo_files, tmp_path):
    assert DataConfig.from_cfg(npy_config(olmo_files)).instances == "per_file"
    assert DataConfig.from_cfg(npy_config(olmo_files, instances=None)).instances == "per_file"  # null: the source's default
    assert DataConfig.from_cfg({"name": "x", "source": "embedded"}).instances == "stream"
    for cfg in ({"name": "x", "source": "embedded"}, {"name": "x", "source": "files", "paths": ["corpus.jsonl"]}):
        with pytest.raises(
            ConfigError, match=r"^data.instances=per_file applies to source=npy only .*: use data.instances=stream or null$"
        ):
            DataConfig.from_cfg({**cfg, "instances": "per_file"})
    with pytest.raises(ConfigError, match="instances"):
        DataConfig.from_cfg(npy_config(olmo_files, instances="documents"))
    data, _ = token_files(olmo_files, tmp_path, [100, 77])
    stream = npy_config(olmo_files, root=str(tmp_path / "prepared"), instances="stream")
    stream["paths"] = {
        "train": [str(tmp_path / "part-000-00000.npy"), str(tmp_path / "part-001-00000.npy")],
        "validation": [str(tmp_path / "part-000-00000.npy")],
    }
    with pytest.raises(
        DataError, match=r"was prepared with a different config: instances='per_file' \(config: 'stream'\); run .*--overwrite"
    ):
        ensure_prepared(stream)
    with pytest.raises(DataError, match="is longer than every train file"):
        TrainBatches(data, 101, 4)


@pytest.mark.slow
def test_train_evaluate_resume_and_filter_on_token_files(olmo_files, runs):
    """Training on the files in place (OLMo's per-file instances) with the repetition filter: the straight run and a
    resumed one agree bit for bit, the filtered count is the direct count over the same batches; a changed file or
    re-prepared data is refused."""
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
