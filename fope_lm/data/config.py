"""The `data` config group (configs/data/*.yaml) as a validated dataclass."""

import dataclasses
import platform
import shlex
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fope_lm.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "data"  # the data group, as scripts/prepare_data.py reads it
DEFAULT_TOKENIZER = "allenai/gpt-neox-olmo-dolma-v1_5"  # OLMo's: 50280 tokens, EOS 0, pad 1
SOURCES = ("embedded", "hf", "files")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from, how it is tokenized and where the prepared shards live."""

    name: str  # the prepared dir is <root>/<name> (embedded: <root>/<name>-py<python version>)
    source: str  # "embedded", "hf" (a Hugging Face Hub dataset, streamed) or "files" (local txt/jsonl/parquet)
    root: str = "data"
    tokenizer: str | None = None  # hub id or local dir; None: DEFAULT_TOKENIZER, or for embedded its own BPE
    hf_path: str | None = None
    hf_name: str | None = None
    text_field: str = "text"
    paths: dict[str, list[str]] | None = None  # split -> files or globs, e.g. {"train": [...], "validation": [...]}
    max_tokens_train: int | None = None
    max_tokens_validation: int | None = None
    validation_every: int = 10  # without a validation split, every n-th document is held out

    @classmethod
    def from_cfg(cls, cfg: "Mapping | DictConfig | DataConfig") -> "DataConfig":
        """Validate a config mapping (a Hydra/OmegaConf node or a plain dict)."""
        if isinstance(cfg, DataConfig):
            return cfg
        values = dict(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg)
        known = {field.name for field in dataclasses.fields(cls)}
        if unknown := sorted(set(values) - known):
            raise ConfigError(f"unknown data config keys {unknown}; known keys: {sorted(known)}")
        if "name" not in values or "source" not in values:
            raise ConfigError("a data config needs `name` and `source` (embedded, hf or files)")
        if values["source"] not in SOURCES:
            raise ConfigError(f"data.source={values['source']!r} is not one of {', '.join(SOURCES)}")
        values["root"] = str(values.get("root") or "data")
        if values["source"] != "embedded" and values.get("tokenizer") is None:
            values["tokenizer"] = DEFAULT_TOKENIZER
        if values["source"] == "hf" and not values.get("hf_path"):
            raise ConfigError("data.source=hf needs hf_path (a Hugging Face dataset id such as allenai/c4)")
        if values["source"] == "files":
            values["paths"] = _split_paths(values.get("paths"))
        for key in ("max_tokens_train", "max_tokens_validation"):
            if values.get(key) is not None and (not isinstance(values[key], int) or values[key] <= 0):
                raise ConfigError(f"data.{key} must be a positive integer or null, got {values[key]!r}")
        every = values.get("validation_every", cls.validation_every)
        if not isinstance(every, int) or every < 2:
            raise ConfigError(f"data.validation_every must be an integer >= 2, got {every!r}")
        return cls(**values)

    @property
    def prepared_dir(self) -> Path:
        if self.source == "embedded":  # its text is the running Python's stdlib, so the version names the corpus
            return Path(self.root) / f"{self.name}-py{platform.python_version()}"
        return Path(self.root) / self.name

    def to_dict(self) -> dict:
        """Everything that determines the prepared data (all fields but `root`), as recorded in metadata.json."""
        values = dataclasses.asdict(self)
        del values["root"]
        return values


def _split_paths(paths) -> dict[str, list[str]]:
    """Accept one path, a list (all train) or a mapping split -> path(s); always return split -> list."""
    if isinstance(paths, str):
        paths = {"train": [paths]}
    elif isinstance(paths, list | tuple):
        paths = {"train": list(paths)}
    if not isinstance(paths, Mapping) or not paths.get("train"):
        raise ConfigError("data.source=files needs paths.train, e.g. paths.train=[corpus/*.jsonl]")
    if unknown := sorted(set(paths) - {"train", "validation"}):
        raise ConfigError(f"data.paths has splits {unknown}; only train and validation are read")
    return {split: [files] if isinstance(files, str) else [str(f) for f in files] for split, files in paths.items()}


def prepare_command(cfg: DataConfig, *, overwrite: bool = False) -> str:
    """The scripts/prepare_data.py command line that builds exactly `cfg`'s prepared dir, for error messages: the
    configs/data/ file of its source that needs the fewest overrides, plus those overrides."""
    wanted = dataclasses.asdict(cfg)
    best: tuple[int, str, list[str]] | None = None
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        base = OmegaConf.load(path)
        if base.get("source") != cfg.source:
            continue
        values = dict(OmegaConf.to_container(base, resolve=True))
        try:
            values = dataclasses.asdict(DataConfig.from_cfg(values))
        except ConfigError:  # a base that needs overrides to be valid at all (e.g. local's paths): compare as written
            pass
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
