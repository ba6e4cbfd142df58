"""Model weights + config on disk: `model.safetensors` and `model_config.json` in a checkpoint directory.

This is the part every stage shares (trainer, eval, export). The trainer adds its own resumable state
(optimizer, data position, RNG) next to these files. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
import torch

from fope_lm.errors import CheckpointError, FopeError
from fope_lm.model import ModelConfig, Transformer
from fope_lm.provenance import git_sha

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
FORMAT_VERSION = 1


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON next to `path`, fsync, then rename over it: readers see the old or the new file, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(directory: str | Path, model: Transformer, metadata: dict | None = None) -> None:
    """Weights as safetensors (tied weights stored once) and the model config as JSON."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt"})
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
        return ModelConfig.from_dict(payload["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"corrupt checkpoint config {path}: {exc}") from None
    except FopeError as exc:
        raise CheckpointError(f"checkpoint {directory} has an incompatible model config: {exc}") from None


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
        state = {**state, "lm_head.weight": state.get("lm_head.weight", state.get("embed.weight"))}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
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
