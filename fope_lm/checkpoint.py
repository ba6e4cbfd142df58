"""Model weights + config on disk: `model.safetensors` and `model_config.json` in a checkpoint directory.

This is the part every stage shares (trainer, eval, export). A run's layout (where its checkpoints live, how one is
published) is fope_lm.run_dir's; the trainer's own resumable state (optimizer, data position, RNG) and its resume
checks are fope_lm.training.checkpointer's. Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from fope_lm.errors import CheckpointError, FopeError
from fope_lm.nn.model import ModelConfig, Transformer
from fope_lm.provenance import git_sha

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
SOURCE_CONFIG = "source_config.json"  # an imported checkpoint's copy of its source's config.json (fope_lm.hf.llama)
FORMAT_VERSION = 1

log = logging.getLogger(__name__)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON next to `path`, fsync, then rename over it: readers see the old or the new file, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def umask() -> int:
    """The process's umask, read without changing it where Linux reports it (/proc/self/status); elsewhere set and
    restored at once, through the most private mask, so a file another thread creates meanwhile is never more open."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open()` gives a new file under the current umask (0o644 under 022, 0o664 under 002)."""
    return 0o666 & ~umask()


def save_model(directory: str | Path, model: Transformer, metadata: dict | None = None) -> None:
    """Weights as safetensors (tied weights stored once) and the model config as JSON.

    safetensors creates its file mode 600; the weights get the umask's mode like every other file of a checkpoint
    (set before the rename: model.safetensors never has another), so teammates who can read the run can load them.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, file_mode())
    os.replace(tmp, directory / WEIGHTS_FILE)
    payload = {"format_version": FORMAT_VERSION, "model": model.config.to_dict(), "git_sha": git_sha()}
    write_json_atomic(directory / CONFIG_FILE, {**payload, **(metadata or {})})


def read_model_config(directory: str | Path) -> ModelConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist; pass the path of a run's checkpoint")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {CONFIG_FILE} is missing")
    try:
        payload = json.loads(path.read_text())
        config = ModelConfig.from_dict(payload["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"corrupt checkpoint config {path}: {exc}") from None
    except FopeError as exc:
        raise CheckpointError(f"checkpoint {directory} has an incompatible model config: {exc}") from None
    if (recorded := payload.get("source_config_sha256")) is not None:  # imported: its source must be the one recorded
        source = directory / SOURCE_CONFIG
        if not source.is_file() or hashlib.sha256(source.read_bytes()).hexdigest() != recorded:
            raise CheckpointError(
                f"{directory} was imported from a config.json that {SOURCE_CONFIG} no longer matches ({payload.get('imported_from')}): "
                "import the source again with scripts/import_hf.py"
            )
    return config


def checkpoint_metadata(directory: str | Path) -> dict:
    """What the trainer recorded next to the model config (train_seq_len, data_dir, data_fingerprint, step, ...)."""
    return json.loads((Path(directory) / CONFIG_FILE).read_text())


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a complete checkpoint: {WEIGHTS_FILE} is missing")
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as exc:  # safetensors raises several types for truncated or garbled files
        raise CheckpointError(f"corrupt weights file {path} ({type(exc).__name__}: {exc}); re-save or pick another checkpoint") from None


def load_weights(model: Transformer, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Strict load that names missing, unexpected and mis-shaped tensors."""
    if model.config.tie_embeddings:
        state = {**state, "lm_head.weight": state.get("lm_head.weight", state["embed.weight"])}
    expected = model.state_dict()
    # scalars that checkpoints of older code hold 0-dim and the model now as (1,) (FIRE's: DeepSpeed flattens no 0-dim)
    state = {k: v.reshape(1) if v.dim() == 0 and k in expected and expected[k].shape == (1,) else v for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        details = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:4])}" if missing else "",
                f"unexpected {', '.join(unexpected[:4])}" if unexpected else "",
                f"shape mismatch {', '.join(mismatched[:4])}" if mismatched else "",
            )
            if part
        )
        raise CheckpointError(f"weights in {source} do not fit the model ({details})")
    model.load_state_dict(state, strict=True)


def load_model(directory: str | Path, *, device: str | torch.device = "cpu", **config_overrides) -> Transformer:
    """Rebuild the model a checkpoint was trained with and load its weights (FoPE coefficients included).

    `config_overrides` change evaluation-time settings that do not alter the weights, e.g.
    pe="yarn", pe_options={"scale": 4} on a RoPE checkpoint.
    """
    config = read_model_config(directory)
    if config_overrides:
        values = {**config.to_dict(), **config_overrides}
        try:
            config = ModelConfig.from_dict(values)
        except FopeError as exc:
            raise CheckpointError(f"cannot apply {config_overrides} to checkpoint {directory}: {exc}") from None
    state = load_state_dict(directory)
    try:
        model = Transformer(config)
    except FopeError as exc:
        raise CheckpointError(f"checkpoint {directory} cannot be built: {exc}") from None
    load_weights(model, state, directory)
    return model.to(device)


def transfer_weights(model: Transformer, directory: str | Path, *, expand: bool = False) -> list[str]:
    """Start `model` from the weights of a checkpoint trained with another PE or length (`init_from`).

    Every non-PE tensor must exist with the same shape (CheckpointError naming those that do not); each layer's
    PE state goes through that layer's `transfer_state`. Returns the notes to log, one per distinct note.
    """
    source_pe = read_model_config(directory).pe
    state = load_state_dict(directory)
    module_names = {id(module): name for name, module in model.named_modules()}
    prefixes = [module_names[id(pe)] + "." for pe in model.position_encodings()]
    own = model.state_dict()
    is_pe = lambda key: key.startswith(tuple(prefixes))  # noqa: E731
    load_weights(model, {k: v for k, v in state.items() if not is_pe(k)} | {k: v for k, v in own.items() if is_pe(k)}, directory)

    layers_by_note: dict[str, list[int]] = {}
    for layer, (prefix, pe) in enumerate(zip(prefixes, model.position_encodings(), strict=True)):
        pe_state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        if not pe_state:
            if pe.state_dict():
                layers_by_note.setdefault(f"{source_pe} has no state to carry: {pe.name} keeps its fresh init", []).append(layer)
            continue
        try:
            notes = pe.transfer_state(pe_state, expand=expand)
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"cannot carry layer {layer}'s {source_pe} state from {directory} into {pe.name}: {exc}") from None
        for note in notes:
            layers_by_note.setdefault(note, []).append(layer)
    return [f"{note} (layers {', '.join(map(str, layers))})" for note, layers in layers_by_note.items()]
