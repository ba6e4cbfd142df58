"""Readers of a prepared dataset: training rows in a seeded, resumable global order, and a fixed validation
prefix that every eval length cuts into chunks the same way."""

import bisect
import fcntl
import hashlib
import json
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fope_lm.data.config import DataConfig, Instances, prepare_command
from fope_lm.data.format import (
    SPLITS,
    TOKENIZER_DIR,
    VERIFIED_DIR,
    compute_fingerprint,
    is_prepared,
    read_metadata,
    rebuild_command,
    sha256_file,
    write_json,
)
from fope_lm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

_SCAN_TOKENS = 2**24  # tokens per chunk when scanning a shard (flat memory)
NO_TARGET = -100  # a label the loss ignores (the model's ignore_index)


class TokenData:
    """A prepared dataset dir: metadata.json and the flat token shards of each split, read through np.memmap.

    Opening checks that every shard exists with the size metadata.json records, and on the first open on a machine
    (`verify_once`) re-hashes every shard and rescans its token ids: a shard whose bytes changed is an error before
    any compute, never a silent change or an out-of-vocabulary crash mid-run.
    """

    def __init__(self, data_dir: str | Path, *, verify: bool = True):
        self.dir = Path(data_dir)
        self.metadata = read_metadata(self.dir)
        self.dtype = np.dtype(self.metadata["dtype"])
        self._shards = {split: self.metadata["splits"][split]["shards"] for split in SPLITS}
        # offsets[split][k] is the position of shard k's first token in the split's stream
        self._offsets = {
            split: np.cumsum([0] + [shard["num_tokens"] for shard in shards]).tolist() for split, shards in self._shards.items()
        }
        for shard in (shard for shards in self._shards.values() for shard in shards):
            self._check_shard_size(shard)
        if verify:
            self.verify_once()

    @classmethod
    def from_config(cls, data_cfg: "Mapping | DataConfig") -> "TokenData":
        """The prepared data a data config names, for training and eval, opened by its absolute path (so the path a run
        records finds it from any working directory): `data.dir` as it is, else `<root>/<name>` (`ensure_prepared`: the
        embedded corpus is prepared on first use). A `<root>/<name>` prepared with other settings than the config's
        is refused with both ways out: the dir as it was prepared (`data.dir=`), or rebuilt with these settings."""
        from fope_lm.data.prepare import ensure_prepared  # prepare reads and writes through this module

        return cls(ensure_prepared(data_cfg).absolute())

    @property
    def vocab_size(self) -> int:
        return self.metadata["tokenizer"]["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.metadata["tokenizer"]["eos_id"]

    @property
    def fingerprint(self) -> str:
        return self.metadata["fingerprint"]

    @property
    def max_token_id(self) -> int:
        return self.metadata["max_token_id"]

    @property
    def tokenizer_dir(self) -> Path:
        """Load with `transformers.AutoTokenizer.from_pretrained(data.tokenizer_dir)` (offline)."""
        return self.dir / TOKENIZER_DIR

    @property
    def instances(self) -> Instances:
        """How training cuts the train split (data.instances, recorded at prepare); dirs without it: the stream."""
        return Instances(self.metadata.get("config", {}).get("instances", Instances.stream))

    def num_tokens(self, split: str) -> int:
        return self._offsets[split][-1]

    def train_instances(self, seq_len: int) -> int:
        """The number of training samples at `seq_len` (`TrainBatches.num_samples`): rows of seq_len + 1 tokens of the
        train stream, (N - 1) // seq_len, or with data.instances=per_file each file's size // seq_len, summed. A global
        batch larger than this would repeat samples within one step."""
        if self.instances == Instances.per_file:
            return int(sum(np.diff(self._offsets["train"]) // seq_len))
        return max(0, (self.num_tokens("train") - 1) // seq_len)

    def shard_offsets(self, split: str) -> list[int]:
        """The position of each shard's first token in the split's stream, then the split's length."""
        return list(self._offsets[split])

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise DataError unless every token id of the data and of its tokenizer fits a model of this vocab size."""
        fix = f"set the model's vocab_size to at least {self.vocab_size} (e.g. {_round_up(self.vocab_size, 128)})"
        if self.max_token_id >= model_vocab_size:
            raise DataError(
                f"{self.dir} has token ids up to {self.max_token_id}, but the model's vocab_size is "
                f"{model_vocab_size}: {fix}, or prepare the data with a smaller tokenizer"
            )
        if self.vocab_size > model_vocab_size:
            raise DataError(
                f"the tokenizer of {self.dir} ({self.metadata['tokenizer']['name']}) has {self.vocab_size} tokens, "
                f"but the model's vocab_size is {model_vocab_size}: {fix}"
            )

    def check_fingerprint(self, expected: str) -> None:
        """Raise DataError unless this is the data a checkpoint (or a config) says it should be."""
        if expected != self.fingerprint:
            raise DataError(
                f"{self.dir} has fingerprint {self.fingerprint[:16]}, expected {expected[:16]}: the data changed "
                "since the checkpoint was made; point data.root at the original data, or start a new run"
            )

    def verify(self) -> None:
        """Re-hash every shard and the tokenizer, and rescan the max token ids, against metadata.json.

        Reads all data once, in chunks (flat memory): minutes for billions of tokens, so it is opt-in.
        """
        fix = f"re-prepare it: `{rebuild_command(self.dir, self.metadata, overwrite=True)}`"
        for split in SPLITS:
            max_token_id = 0
            for shard in self._shards[split]:
                path = self.dir / shard["file"]
                digest = hashlib.sha256()
                tokens = np.memmap(path, dtype=self.dtype, mode="r")
                for start in range(0, tokens.size, _SCAN_TOKENS):
                    chunk = tokens[start : start + _SCAN_TOKENS]
                    digest.update(chunk.tobytes())
                    max_token_id = max(max_token_id, int(chunk.max()))
                del tokens, chunk  # unmap
                if digest.hexdigest() != shard["sha256"]:
                    raise DataError(f"shard {path} does not match its sha256 in metadata.json: {fix}")
            recorded = self.metadata["splits"][split]["max_token_id"]
            if max_token_id != recorded:
                raise DataError(f"the {split} split of {self.dir} has max token id {max_token_id}, metadata.json says {recorded}: {fix}")
        tokenizer_file = self.tokenizer_dir / "tokenizer.json"
        if not tokenizer_file.is_file() or sha256_file(tokenizer_file) != self.metadata["tokenizer"]["sha256"]:
            raise DataError(f"{tokenizer_file} is missing or is not the tokenizer the shards were made with: {fix}")
        if compute_fingerprint(self.metadata) != self.fingerprint:
            raise DataError(f"the fingerprint in {self.dir}/metadata.json does not match its contents: {fix}")

    def verify_once(self) -> None:
        """`verify()`, unless this machine's marker says the same files (path, size, mtime, inode, device) passed it
        already: a 20 GB corpus is hashed once, and again only when a file is replaced or rewritten. Processes of one
        machine take turns (a file lock), so eight ranks hash it once between them. The marker lives in the data dir,
        or under ~/.cache/fope_lm when that is read-only."""
        marker = verified_marker(self.dir)
        expected = {"fingerprint": self.fingerprint, "files": self._file_identities()}
        if _read_json(marker) == expected:
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        logger.info("verifying %s on this machine (once: sha256 of every shard, max token ids)", self.dir)
        with open(marker.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if _read_json(marker) == expected:  # another process of this machine verified it meanwhile
                return
            self.verify()
            write_json(marker, expected)

    def mark_verified(self) -> None:
        """Record that this machine's files match metadata.json (prepare calls it: it just hashed what it wrote)."""
        marker = verified_marker(self.dir)
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"fingerprint": self.fingerprint, "files": self._file_identities()})

    def _file_identities(self) -> dict[str, list[int]]:
        files = [shard["file"] for shards in self._shards.values() for shard in shards] + [f"{TOKENIZER_DIR}/tokenizer.json"]
        identities = {}
        for name in files:
            stat = (self.dir / name).stat() if (self.dir / name).exists() else None
            identities[name] = [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev] if stat else []
        return identities

    def read(self, split: str, starts: np.ndarray, length: int) -> np.ndarray:
        """The windows tokens[s : s + length] of a split's stream for each s in `starts`, as int64 (n, length).

        Windows may cross shard boundaries. The memmaps live only for this call, so the pages a long run has read
        are not kept mapped (and counted) in this process.
        """
        shards = [np.memmap(self.dir / shard["file"], dtype=self.dtype, mode="r") for shard in self._shards[split]]
        offsets = self._offsets[split]
        windows = np.empty((len(starts), length), dtype=np.int64)
        for window, start in zip(windows, starts, strict=True):
            if not 0 <= start <= offsets[-1] - length:
                raise IndexError(f"window [{start}, {start + length}) is outside the {offsets[-1]} {split} tokens")
            filled = 0
            while filled < length:
                position = start + filled
                shard = bisect.bisect_right(offsets, position) - 1
                begin = position - offsets[shard]
                count = min(length - filled, offsets[shard + 1] - position)
                window[filled : filled + count] = shards[shard][begin : begin + count]
                filled += count
        if windows.size and (largest := int(windows.max())) >= self.vocab_size:  # one pass over a batch: cheap
            fix = rebuild_command(self.dir, self.metadata, overwrite=True)
            raise DataError(f"the {split} split of {self.dir} holds token id {largest}, beyond its tokenizer's {self.vocab_size} ids: "
                            f"a shard was modified after it was verified; re-prepare it: `{fix}`")  # fmt: skip
        return windows

    def _check_shard_size(self, shard: dict) -> None:
        path = self.dir / shard["file"]
        fix = f"the data dir is incomplete or was modified; re-prepare it: `{rebuild_command(self.dir, self.metadata, overwrite=True)}`"
        if not path.is_file():
            raise DataError(f"shard {path} listed in metadata.json is missing: {fix}")
        expected = shard["num_tokens"] * self.dtype.itemsize
        if (size := path.stat().st_size) != expected:
            raise DataError(
                f"shard {path} has {size} bytes, but metadata.json records {shard['num_tokens']} {self.dtype} "
                f"tokens ({expected} bytes): {fix}"
            )


class TrainBatches:
    """Training rows of `seq_len + 1` tokens (inputs row[:-1], labels row[1:]) in a seeded global order, split
    across data-parallel ranks. The samples depend on `data.instances`:

    - stream: sample i is tokens[i*T : i*T + T + 1] of the train stream (rows may cross shard boundaries), for
      i < num_samples = (N - 1) // T.
    - per_file (source=npy; OLMo's MemMapDataset and OLMo-core's NumpyFSLDataset): file f holds size_f // T
      instances, its tokens[j*T : (j+1)*T] (the remainder dropped), numbered across the files in order; sample i
      is instance i. Its row is the instance plus NO_TARGET: the model's inputs are exactly OLMo's instance, and
      the labels the instance shifted with no target at the last position, as OLMo's loss has it.

    Epoch e visits every sample once, in the order of a permutation drawn from `np.random.default_rng((seed, e))`;
    epochs follow each other in one infinite order. Global step s takes the order positions [s*G, (s+1)*G), and
    rank r its contiguous slice of G/W, so the order does not depend on the world size, and the position (samples
    consumed) resumes at any world size. The current epoch's permutation is held in memory: 8 bytes per sample.
    """

    def __init__(
        self,
        data: TokenData,
        seq_len: int,
        global_batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if global_batch_size % world_size:
            raise DataError(
                f"global_batch_size={global_batch_size} is not divisible by world_size={world_size}: use a multiple of {world_size}"
            )
        if not 0 <= rank < world_size or seq_len < 1 or global_batch_size < 1:
            raise ValueError(f"invalid {rank=}, {world_size=}, {seq_len=} or {global_batch_size=}")
        self.data, self.seq_len, self.seed, self.instances = data, seq_len, seed, data.instances
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.local_batch_size = global_batch_size // world_size
        if self.instances == Instances.per_file:
            offsets = np.array(data.shard_offsets("train"))
            self._file_starts = offsets[:-1]  # each file's first token in the stream
            self._first_samples = np.cumsum([0, *(np.diff(offsets) // seq_len)])  # each file's first instance
            self.num_samples = int(self._first_samples[-1])  # = data.train_instances(seq_len)
            if self.num_samples == 0:
                raise DataError(
                    f"seq_len={seq_len} is longer than every train file of {data.dir} (data.instances=per_file cuts "
                    "each file on its own): use a shorter seq_len, or data.instances=stream"
                )
        else:
            num_tokens = data.num_tokens("train")
            if num_tokens < seq_len + 1:
                raise DataError(
                    f"seq_len={seq_len} needs at least {seq_len + 1} train tokens, but {data.dir} has only "
                    f"{num_tokens}: use a shorter seq_len or prepare more data"
                )
            self.num_samples = data.train_instances(seq_len)
        self.samples_consumed = 0  # global, over all ranks and epochs
        self._orders: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        return self.samples_consumed // self.num_samples

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of sample indices that epoch `epoch` visits."""
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_samples)

    def next_batch(self) -> torch.Tensor:
        """This rank's share of the next global batch: a LongTensor (global_batch_size // world_size, seq_len + 1)."""
        first = self.samples_consumed + self.rank * self.local_batch_size
        samples = self._samples_at(np.arange(first, first + self.local_batch_size))
        self.samples_consumed += self.global_batch_size
        return torch.from_numpy(self.rows(samples))

    def rows(self, samples: np.ndarray) -> np.ndarray:
        """The rows (n, seq_len + 1) of sample indices `samples`, as int64."""
        if self.instances == Instances.stream:
            return self.data.read("train", samples * self.seq_len, self.seq_len + 1)
        files = np.searchsorted(self._first_samples, samples, side="right") - 1  # empty files are skipped
        starts = self._file_starts[files] + (samples - self._first_samples[files]) * self.seq_len
        instances = self.data.read("train", starts, self.seq_len)  # each lies within its file
        return np.concatenate([instances, np.full((len(samples), 1), NO_TARGET, dtype=np.int64)], axis=1)

    def state_dict(self) -> dict:
        return {
            "samples_consumed": self.samples_consumed,
            "epoch": self.epoch,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "instances": str(self.instances),
            "data_fingerprint": self.data.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the world size and global batch size may differ from the saved run's."""
        self.data.check_fingerprint(state["data_fingerprint"])
        for key in ("seed", "seq_len"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"the saved data position is for {key}={state[key]}, but this run uses {key}={getattr(self, key)}: "
                    f"resume with {key}={state[key]}, or start a new run"
                )
        saved = state.get("instances", Instances.stream)  # checkpoints of older code read the stream
        if saved != self.instances:
            raise DataError(
                f"the saved data position is for data.instances={saved}, but this run uses data.instances={self.instances}: "
                f"resume with data.instances={saved} (its data prepared with it), or start a new run"
            )
        self.samples_consumed = state["samples_consumed"]

    def _samples_at(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, self.num_samples)
        # Keep only the permutations this batch needs (at most two when it straddles an epoch boundary).
        needed = [int(epoch) for epoch in np.unique(epochs)]
        self._orders = {epoch: self._orders[epoch] if epoch in self._orders else self.order(epoch) for epoch in needed}
        samples = np.empty_like(positions)
        for epoch, order in self._orders.items():
            in_epoch = epochs == epoch
            samples[in_epoch] = order[offsets[in_epoch]]
        return samples


class ValidationTokens:
    """A fixed prefix of the validation split, cut into chunks of any length that divides `max_len`.

    The prefix is the first `total_tokens` tokens rounded down to a multiple of `max_len`, so every eval length
    sees exactly the same text.
    """

    def __init__(self, data: TokenData, total_tokens: int, max_len: int):
        available = data.num_tokens("validation")
        if available < max_len:
            raise DataError(
                f"the validation split of {data.dir} has {available} tokens, fewer than max_len={max_len}: "
                "evaluate shorter lengths, or prepare more validation data (max_tokens_validation)"
            )
        if total_tokens < max_len:
            raise ConfigError(f"total_tokens={total_tokens} is less than max_len={max_len}: raise it")
        self.max_len = max_len
        self.num_tokens = min(total_tokens, available) // max_len * max_len
        self.tokens = torch.from_numpy(data.read("validation", np.array([0]), self.num_tokens)[0])

    def chunks(self, seq_len: int) -> torch.Tensor:
        """The prefix as a LongTensor (num_tokens // seq_len, seq_len): a view, so do not modify it in place."""
        if self.max_len % seq_len:
            raise ConfigError(f"eval length {seq_len} does not divide max_len={self.max_len}: use a divisor of it")
        return self.tokens.view(-1, seq_len)


def verified_marker(data_dir: Path) -> Path:
    """Where `TokenData.verify_once` records that this machine verified `data_dir`."""
    name = f"{socket.gethostname()}.json"
    if os.access(data_dir, os.W_OK):
        return data_dir / VERIFIED_DIR / name
    key = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fope_lm" / "verified" / key / name


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
