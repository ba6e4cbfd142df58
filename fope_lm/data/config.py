"""The `data` config group (configs/data/*.yaml) as a validated dataclass."""

import dataclasses
import functools
import platform
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from fope_lm import paths
from fope_lm.errors import ConfigError, DataError
from fope_lm.schema import Choice, validated

CONFIG_DIR = paths.CONFIG_DIR / "data"  # the data group, as scripts/prepare_data.py reads it (a checkout or the installed package)
DEFAULT_TOKENIZER = "allenai/gpt-neox-olmo-dolma-v1_5"  # OLMo's: 50280 tokens, EOS 0, pad 1


class DataSource(Choice):
    embedded = "embedded"  # this Python's standard-library docs, offline
    hf = "hf"  # a Hugging Face Hub dataset, streamed
    files = "files"  # local txt/jsonl/parquet
    npy = "npy"  # OLMo's pre-tokenized token files, used in place


class Instances(Choice):
    """How training cuts the train split into instances (fope_lm.data.dataset.TrainBatches)."""

    per_file = "per_file"  # OLMo's: each token file on its own, size // seq_len instances, its remainder dropped (npy)
    stream = "stream"  # the split as one concatenated stream, windows every seq_len tokens (may cross files)


class OnBadRecord(Choice):
    """What prepare does with a document whose text is missing, null, not a string, or not valid UTF-8 / JSON."""

    error = "error"  # a one-line DataError naming the file and line
    skip = "skip"  # left out; the count is logged and recorded in metadata.json (splits.<split>.skipped_records)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from, how it is tokenized and where the prepared shards live (the values: the data group,
    configs/data/*.yaml; the checks: __post_init__, fope_lm.schema's pattern).

    `dir` names a prepared dir to train or evaluate on as it is (`data.dir=PATH`): `from_cfg` then ignores every other
    key given and returns the config the dir was prepared with (its metadata.json), `dir` set to its absolute path."""

    name: str = MISSING  # the prepared dir is <root>/<name> (embedded: <root>/<name>-py<python version>)
    source: DataSource = MISSING
    root: str = "data"
    tokenizer: str | None = None  # hub id or local dir; None: DEFAULT_TOKENIZER, or for embedded its own BPE
    hf_path: str | None = None
    hf_name: str | None = None
    text_field: str = "text"
    paths: Any = None  # split -> files or globs, e.g. {"train": [...], "validation": [...]} (one path or a list: train)
    max_tokens_train: int | None = None
    max_tokens_validation: int | None = None
    validation_every: int = 10  # without a validation split, every n-th document is held out
    dtype: str | None = None  # source=npy: the files' token dtype, uint16 (the default) or uint32
    instances: Instances | None = None  # per_file | stream; None: per_file for source=npy (OLMo's), else stream
    on_bad_record: OnBadRecord = OnBadRecord.error  # error | skip (see OnBadRecord)
    dir: str | None = None  # a prepared dir, used as it is: its metadata.json gives all of the above (of_prepared_dir)

    def __post_init__(self):
        set_field = functools.partial(object.__setattr__, self)  # frozen: the normalised values are set once, here
        if self.source not in DataSource.__members__:
            raise ConfigError(f"data.source={self.source!r} is not one of {DataSource.names()}")
        set_field("source", DataSource(self.source))
        set_field("root", str(self.root or "data"))
        if self.source != DataSource.embedded and self.tokenizer is None:
            set_field("tokenizer", DEFAULT_TOKENIZER)
        if self.source == DataSource.hf and not self.hf_path:
            raise ConfigError("data.source=hf needs hf_path (a Hugging Face dataset id such as allenai/c4)")
        if self.source in (DataSource.files, DataSource.npy):
            set_field("paths", _split_paths(self.paths))
        if self.source == DataSource.npy:
            if "validation" not in self.paths:
                raise ConfigError(
                    "data.source=npy needs paths.validation too (token files are used in place, not split): "
                    "e.g. paths.validation=[/data/c4-val/*.npy]"
                )
            set_field("dtype", self.dtype or "uint16")
            if self.dtype not in ("uint16", "uint32"):
                raise ConfigError(f"data.dtype must be uint16 or uint32 (the token files' dtype), got {self.dtype!r}")
        elif self.dtype is not None:
            raise ConfigError(
                f"data.dtype applies to source=npy only (prepare picks the dtype of the shards it writes), got {self.dtype!r}"
            )
        if self.instances is None:
            set_field("instances", default_instances(self.source))
        if self.instances not in Instances.__members__:
            raise ConfigError(f"data.instances={self.instances!r} is not one of {Instances.names()}")
        set_field("instances", Instances(self.instances))
        if self.instances == Instances.per_file and self.source != DataSource.npy:
            raise ConfigError(
                f"data.instances=per_file applies to source=npy only (OLMo's token files), not source={self.source}: "
                "use data.instances=stream or null"
            )
        for key in ("max_tokens_train", "max_tokens_validation"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"data.{key} must be a positive integer or null, got {getattr(self, key)!r}")
        if self.validation_every < 2:
            raise ConfigError(f"data.validation_every must be an integer >= 2, got {self.validation_every!r}")

    @classmethod
    def from_cfg(cls, cfg: "Mapping | DictConfig | DataConfig") -> "DataConfig":
        """Validate a config mapping (a Hydra/OmegaConf node or a plain dict); one with a `dir` is that prepared dir's
        config (`of_prepared_dir`), whatever its other keys say."""
        if not isinstance(cfg, DataConfig) and isinstance(cfg, Mapping) and cfg.get("dir") is not None:
            return cls.of_prepared_dir(cfg["dir"])
        return validated(cls, cfg)

    @classmethod
    def of_prepared_dir(cls, data_dir: "str | Path") -> "DataConfig":
        """The config a prepared dir was made with (the `config` its metadata.json records, `root` its parent), with
        `dir` set to its absolute path: tokenizer, vocab, EOS, dtype and fingerprint are the dir's own. A dir without
        metadata.json or tokenizer/ is a one-line DataError naming what is missing."""
        from fope_lm.data.format import METADATA_FILE, TOKENIZER_DIR, read_metadata  # format imports this module

        path = Path(data_dir).expanduser().absolute()
        fix = "pass the dir that scripts/prepare_data.py wrote, <root>/<name> (metadata.json, tokenizer/ and the shards)"
        if not path.is_dir():
            raise DataError(f"data.dir={data_dir}: no such directory; {fix}")
        wanted = {METADATA_FILE: path / METADATA_FILE, f"{TOKENIZER_DIR}/tokenizer.json": path / TOKENIZER_DIR / "tokenizer.json"}
        if missing := [name for name, file in wanted.items() if not file.is_file()]:
            raise DataError(f"data.dir={data_dir} is not a prepared dataset: it has no {' and no '.join(missing)}; {fix}")
        metadata = read_metadata(path)  # valid JSON of the format this code reads, else one line
        if not isinstance(recorded := metadata.get("config"), Mapping):
            raise DataError(
                f"data.dir={data_dir}: its {METADATA_FILE} records no data config (prepared by older code): "
                f"re-prepare it with scripts/prepare_data.py --overwrite"
            )
        return validated(cls, {**recorded, "root": str(path.parent), "dir": str(path)})

    @property
    def prepared_dir(self) -> Path:
        if self.dir is not None:
            return Path(self.dir)
        if self.source == DataSource.embedded:  # its text is the running Python's stdlib, so the version names the corpus
            return Path(self.root) / f"{self.name}-py{platform.python_version()}"
        return Path(self.root) / self.name

    def to_dict(self) -> dict:
        """Everything that determines the prepared data and the instances training cuts from it (all fields but
        `root`), as recorded in metadata.json: `TokenData.instances` reads the cut from there, and a config with
        another cut is refused like any other change (re-prepare, or use another name)."""
        values = self.to_config()
        del values["root"], values["dir"]
        if self.on_bad_record == OnBadRecord.error:  # the default, absent from dirs prepared before the field existed
            del values["on_bad_record"]
        if values["dtype"] is None:  # dirs prepared before the field existed have no such key
            del values["dtype"]
        if self.source != DataSource.npy:  # likewise; and they can only be read as one stream
            del values["instances"]
        return values

    def to_config(self) -> dict:
        """Every key, as configs/data/*.yaml spells it (plain values): what a run records as its data config."""
        values = dataclasses.asdict(self)
        for key in ("source", "instances", "on_bad_record"):
            values[key] = None if values[key] is None else str(values[key])
        return values

    def differences(self, prepared_with: Mapping) -> dict[str, tuple[Any, Any]]:
        """key -> (prepared, configured) for each `to_dict()` value that differs from the config a dir was prepared
        with (its metadata.json's `config`)."""
        return {key: (prepared_with.get(key), value) for key, value in self.to_dict().items() if prepared_with.get(key) != value}


def default_instances(source: DataSource) -> Instances:
    """OLMo's per-file instances for its token files (so the paper's data gives the paper's instances), else the
    stream: prepare's own shards are cuts of one stream, whose boundaries mean nothing."""
    return Instances.per_file if source == DataSource.npy else Instances.stream


def _split_paths(paths) -> dict[str, list[str]]:
    """Accept one path, a list (all train) or a mapping split -> path(s); always return split -> list."""
    if isinstance(paths, Mapping):  # a split given as null (a config's placeholder for overrides) is absent
        paths = {split: files for split, files in paths.items() if files is not None}
    if isinstance(paths, str):
        paths = {"train": [paths]}
    elif isinstance(paths, list | tuple):
        paths = {"train": list(paths)}
    if not isinstance(paths, Mapping) or not paths.get("train"):
        raise ConfigError("data.source=files and npy need paths.train, e.g. paths.train=[corpus/*.jsonl]")
    if unknown := sorted(set(paths) - {"train", "validation"}):
        raise ConfigError(f"data.paths has splits {unknown}; only train and validation are read")
    return {split: [files] if isinstance(files, str) else [str(f) for f in files] for split, files in paths.items()}


def prepare_command(cfg: DataConfig, *, overwrite: bool = False) -> str:
    """The scripts/prepare_data.py command line that builds exactly `cfg`'s prepared dir, for error messages: the
    configs/data/ file of its source that needs the fewest overrides, plus those overrides."""
    wanted = dataclasses.asdict(cfg)
    del wanted["dir"]  # prepare writes <root>/<name>; `dir` only names a prepared dir to read
    best: tuple[int, str, list[str]] | None = None
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        values: dict = OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[assignment]  # a mapping
        if values.get("source") != cfg.source:
            continue
        try:
            values = dataclasses.asdict(DataConfig.from_cfg(values))
        except ConfigError:  # a base that needs overrides to be valid at all (e.g. local's paths): compare as written
            if values.get("instances") is None:  # unset: its source's default
                values["instances"] = default_instances(cfg.source)
            values.setdefault("on_bad_record", OnBadRecord.error)
        overrides = [override for key in wanted for override in _overrides(key, values.get(key), wanted[key])]
        if best is None or len(overrides) < best[0]:
            best = (len(overrides), path.stem, overrides)
    if best is None:  # no data config of this source: state every field
        best = (0, "local", [override for key in wanted for override in _overrides(key, None, wanted[key])])
    _, name, overrides = best
    words = ["python", "scripts/prepare_data.py", name, *overrides] + (["--overwrite"] if overwrite else [])
    return " ".join(shlex.quote(word) for word in words)


def _overrides(key: str, base, value) -> list[str]:
    """key=value words (Hydra/OmegaConf dotlist syntax) that turn `base` into `value`."""
    if base == value:
        return []
    if isinstance(value, Mapping):
        base = base if isinstance(base, Mapping) else {}
        return [word for sub in value for word in _overrides(f"{key}.{sub}", base.get(sub), value[sub])]
    if value is None:
        return [f"{key}=null"]
    if isinstance(value, list | tuple):
        return [f"{key}=[{','.join(map(str, value))}]"]
    return [f"{key}={value}"]
