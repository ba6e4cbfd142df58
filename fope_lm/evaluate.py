"""The evaluation protocol of docs/eval.md: perplexity across context lengths and passkey retrieval.

Two entry points:
  - `perplexity_by_length(model, val_tokens, lengths, ...)`: model-only, for the trainer's in-loop eval;
  - `evaluate_checkpoint(cfg)` (behind eval.py): a checkpoint plus eval-time YaRN -> a results dict that
    `write_results` turns into results.json (schema-checked), a CSV, a markdown table and a plot.

Perplexity at length T: the same token prefix (a multiple of the largest T) is cut into non-overlapping
chunks of T tokens, each run from position 0; the mean next-token cross-entropy over all T-1 targets of every
chunk gives ppl = exp(loss). Batches hold max(1, tokens_per_batch // T) chunks. Losses are also summed per
position bucket [0, L), [L, 2L), [2L, 4L), ... of the predicting position (L the training length), so
in-distribution and extrapolated positions can be told apart. With `perplexity.per_document` each document is
scored alone instead (`per_document_perplexity`), bucketed by position within its document.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fope_lm import checkpoint as checkpoints
from fope_lm import report
from fope_lm.data import TokenData, ValidationTokens, ensure_prepared, load_tokenizer
from fope_lm.documents import document_positions
from fope_lm.errors import ConfigError, DataError
from fope_lm.eval_config import EvalConfig, ScalingEvalConfig, ScalingMethod, WandbConfig
from fope_lm.generate import inference, lm_logits
from fope_lm.metrics import start_wandb
from fope_lm.model import ModelConfig, Transformer
from fope_lm.passkey import evaluate_passkey
from fope_lm.position import RotaryEncoding, get_class
from fope_lm.provenance import git_sha, package_versions

logger = logging.getLogger(__name__)

DEFAULT_LOSS_CHUNK_TOKENS = 4096
RESULTS_FORMAT_VERSION = 2  # 2: eval_scaling (any method) replaced eval_yarn
RESULTS_SCHEMA = Path(__file__).parent / "schemas" / "results.schema.json"
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


# --- the protocol on a live model ---------------------------------------------------------------------------
@torch.no_grad()
def token_losses(
    model: Transformer, input_ids: torch.Tensor, *, loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS, **forward_kwargs
) -> torch.Tensor:
    """Next-token cross-entropy (B, T-1) in float32: column p is the loss of predicting token p+1 from position p.

    The LM head runs on `loss_chunk_tokens` (batch x position) rows at a time, so at most that many rows of
    float32 logits exist at once, whatever B and T.
    """
    batch, length = input_ids.shape
    hidden = model.hidden_states(input_ids, **forward_kwargs)[:, :-1].flatten(0, 1)
    targets = input_ids[:, 1:].flatten()
    losses = []
    for rows in zip(hidden.split(loss_chunk_tokens), targets.split(loss_chunk_tokens), strict=True):
        losses.append(F.cross_entropy(lm_logits(model, rows[0]), rows[1], reduction="none"))
    return torch.cat(losses).view(batch, length - 1)


def position_buckets(train_len: int, n_positions: int) -> list[tuple[int, int]]:
    """[0, L), [L, 2L), [2L, 4L), ... until the buckets cover positions 0 .. n_positions - 1."""
    buckets, start, end = [], 0, train_len
    while start < n_positions:
        buckets.append((start, end))
        start, end = end, 2 * end
    return buckets


def _long_tokens(val_tokens) -> torch.Tensor:
    if not isinstance(val_tokens, torch.Tensor):  # numpy, e.g. a uint16 memmap
        val_tokens = torch.from_numpy(np.asarray(val_tokens, dtype=np.int64))
    return val_tokens.long().flatten()


def _same_text_prefix(tokens: torch.Tensor, longest: int) -> torch.Tensor:
    """The prefix every length evaluates: rounded down to a multiple of the largest length."""
    usable = tokens.numel() // longest * longest
    if usable == 0:
        raise DataError(f"{tokens.numel()} validation tokens are fewer than the largest eval length {longest}")
    return tokens[:usable]


def eval_chunks(val_tokens, lengths: list[int]) -> dict[int, torch.Tensor]:
    """The (n_chunks, T) chunks of each length, all cut from one prefix (a multiple of the largest length): every
    length that divides it sees exactly the same tokens; any other drops only the tail."""
    tokens = _same_text_prefix(_long_tokens(val_tokens), max(lengths))
    return {length: tokens[: tokens.numel() // length * length].view(-1, length) for length in lengths}


def perplexity_by_length(
    model: Transformer,
    val_tokens,
    lengths: list[int],
    tokens_per_batch: int | None = None,
    *,
    train_len: int | None = None,
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[int, dict]:
    """Perplexity of non-overlapping chunks at each length, on the same token prefix for every length.

    val_tokens: a 1-D token stream (tensor or numpy array, e.g. `ValidationTokens.tokens`); it is cut to a
    multiple of max(lengths). tokens_per_batch defaults to max(lengths) (batch 1 at the top length);
    train_len (the bucket unit) defaults to the model's max_seq_len. Returns {T: {"loss", "ppl",
    "scored_tokens", "n_chunks", "batch_size", "buckets", "wall_time_s", "length"}} in the order of `lengths`.
    The model's training mode is restored afterwards, so the trainer can call this between steps.
    """
    tokens_per_batch = tokens_per_batch or max(lengths)
    train_len = train_len or model.config.max_seq_len
    device = next(model.parameters()).device
    results = {}
    with inference(model, autocast_dtype):
        for length, chunks in eval_chunks(val_tokens, lengths).items():
            started = time.perf_counter()
            batch_size = max(1, tokens_per_batch // length)
            loss_per_position = torch.zeros(length - 1, dtype=torch.float64)  # summed over chunks
            for batch in tqdm(chunks.split(batch_size), desc=f"ppl T={length}", disable=not progress, leave=False):
                losses = token_losses(model, batch.to(device), loss_chunk_tokens=loss_chunk_tokens)
                loss_per_position += losses.sum(dim=0).double().cpu()
            n_chunks = chunks.shape[0]
            loss = loss_per_position.sum().item() / (n_chunks * (length - 1))
            buckets = []
            for start, end in position_buckets(train_len, length - 1):
                bucket = loss_per_position[start:end]
                scored = n_chunks * bucket.numel()
                loss_in_bucket = bucket.sum().item() / scored
                buckets.append({"start": start, "end": end, "scored_tokens": scored, "loss": loss_in_bucket})
            results[length] = {
                "length": length,
                "batch_size": batch_size,
                "n_chunks": n_chunks,
                "scored_tokens": n_chunks * (length - 1),
                "loss": loss,
                "ppl": math.exp(loss),
                "buckets": buckets,
                "wall_time_s": round(time.perf_counter() - started, 3),
            }
            logger.info(f"T={length:>6}: loss {loss:.4f}  ppl {math.exp(loss):.2f}  ({n_chunks} chunks)")
    return results


def split_documents(tokens: torch.Tensor, eos_id: int) -> list[torch.Tensor]:
    """The documents of a 1-D token stream, each with its closing EOS (the last may be cut by the stream's end);
    documents of one token (nothing to predict) are left out."""
    ends = (torch.nonzero(tokens == eos_id).flatten() + 1).tolist()
    if not ends or ends[-1] != tokens.numel():
        ends.append(tokens.numel())
    documents = torch.tensor_split(tokens, ends[:-1])
    return [document for document in documents if document.numel() > 1]


def pack_documents(documents: list[torch.Tensor], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (n, length) holding each document's first `length` tokens, in order, none split across rows, and their
    document ids (n, length): the document's index, and for a row's unused tail (padding) len(documents), so that
    the ids never decrease along a row."""
    rows: list[list[torch.Tensor]] = []
    ids: list[list[torch.Tensor]] = []
    row: list[torch.Tensor] = []
    row_ids: list[torch.Tensor] = []
    for number, document in enumerate(documents):
        document = document[:length]
        if sum(part.numel() for part in row) + document.numel() > length:
            rows.append(row)
            ids.append(row_ids)
            row, row_ids = [], []
        row.append(document)
        row_ids.append(torch.full_like(document, number))
    rows.append(row)
    ids.append(row_ids)
    padded_rows, padded_ids = [], []
    for row, row_ids in zip(rows, ids, strict=True):
        used = sum(part.numel() for part in row)
        padded_rows.append(torch.cat([*row, torch.full((length - used,), pad_id, dtype=torch.long)]))
        padded_ids.append(torch.cat([*row_ids, torch.full((length - used,), len(documents), dtype=torch.long)]))
    return torch.stack(padded_rows), torch.stack(padded_ids)


def per_document_perplexity(
    model: Transformer,
    val_tokens,
    lengths: list[int],
    tokens_per_batch: int | None = None,
    *,
    eos_id: int,
    train_len: int | None = None,
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[int, dict]:
    """Each document scored alone, up to T tokens of it: the documents of the same token prefix as
    `perplexity_by_length`'s, each cut to its first T tokens, packed into rows of T with document masking and
    positions restarting at each document (so every token sees exactly its document's earlier tokens), and the
    loss bucketed by the predicting position within its document. Rows as perplexity_by_length's, plus
    n_documents; n_chunks counts the packed rows."""
    tokens_per_batch = tokens_per_batch or max(lengths)
    train_len = train_len or model.config.max_seq_len
    device = next(model.parameters()).device
    documents = split_documents(_same_text_prefix(_long_tokens(val_tokens), max(lengths)), eos_id)
    if not documents:
        raise DataError("the validation tokens hold no document of two or more tokens to score")
    results = {}
    with inference(model, autocast_dtype):
        for length in lengths:
            started = time.perf_counter()
            rows, ids = pack_documents(documents, length, pad_id=eos_id)
            batch_size = max(1, tokens_per_batch // length)
            loss_sum = torch.zeros(length - 1, dtype=torch.float64)  # by predicting position within the document
            scored = torch.zeros(length - 1, dtype=torch.float64)
            for batch, batch_ids in tqdm(
                zip(rows.split(batch_size), ids.split(batch_size), strict=True),
                desc=f"ppl/doc T={length}",
                disable=not progress,
                leave=False,
            ):
                losses = (
                    token_losses(model, batch.to(device), loss_chunk_tokens=loss_chunk_tokens, doc_ids=batch_ids.to(device)).double().cpu()
                )
                target_in_document = (batch_ids[:, 1:] == batch_ids[:, :-1]) & (batch_ids[:, :-1] < len(documents))
                position = document_positions(batch_ids)[:, :-1]
                loss_sum.index_add_(0, position[target_in_document], losses[target_in_document])
                scored.index_add_(0, position[target_in_document], torch.ones_like(losses[target_in_document]))
            total = int(scored.sum().item())
            loss = loss_sum.sum().item() / total
            buckets = []
            for start, end in position_buckets(train_len, length - 1):
                in_bucket = int(scored[start:end].sum().item())
                if in_bucket:  # no document reaches the bucket: nothing to report
                    buckets.append(
                        {"start": start, "end": end, "scored_tokens": in_bucket, "loss": loss_sum[start:end].sum().item() / in_bucket}
                    )
            results[length] = {
                "length": length,
                "batch_size": batch_size,
                "n_chunks": rows.shape[0],
                "n_documents": len(documents),
                "scored_tokens": total,
                "loss": loss,
                "ppl": math.exp(loss),
                "buckets": buckets,
                "wall_time_s": round(time.perf_counter() - started, 3),
            }
            logger.info(
                f"T={length:>6}: loss {loss:.4f}  ppl {math.exp(loss):.2f}  ({len(documents)} documents alone, {rows.shape[0]} rows)"
            )
    return results


def sliding_window_perplexity(
    model: Transformer,
    val_tokens,
    window: int,
    stride: int,
    tokens_per_batch: int | None = None,
    *,
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict:
    """Windows of `window` tokens every `stride` tokens; each scores only its last `stride` targets (the first
    window scores all of its window - 1), so every token after the first is scored once, with >= window - stride
    tokens of context."""
    if not 1 <= stride < window:
        raise ConfigError(f"sliding window stride must be in [1, window={window}), got {stride}")
    tokens = _same_text_prefix(_long_tokens(val_tokens), window)
    starts = list(range(0, tokens.numel() - window + 1, stride))
    batch_size = max(1, (tokens_per_batch or window) // window)
    device = next(model.parameters()).device
    started = time.perf_counter()
    total, scored = 0.0, 0
    with inference(model, autocast_dtype):
        batches = range(0, len(starts), batch_size)
        for first in tqdm(batches, desc=f"sliding window={window}", disable=not progress, leave=False):
            batch_starts = starts[first : first + batch_size]
            windows = torch.stack([tokens[start : start + window] for start in batch_starts]).to(device)
            losses = token_losses(model, windows, loss_chunk_tokens=loss_chunk_tokens).double().cpu()
            for start, row in zip(batch_starts, losses, strict=True):
                kept = row if start == 0 else row[-stride:]
                total += kept.sum().item()
                scored += kept.numel()
    return {
        "window": window,
        "stride": stride,
        "n_windows": len(starts),
        "scored_tokens": scored,
        "loss": total / scored,
        "ppl": math.exp(total / scored),
        "wall_time_s": round(time.perf_counter() - started, 3),
    }


# --- the trainer's in-loop eval ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _validation_prefix(data_dir: str, tokens_total: int, max_len: int) -> torch.Tensor:
    return ValidationTokens(TokenData(data_dir), tokens_total, max_len).tokens


def length_eval_hook(
    *, model, accelerator, step: int, data, lengths: list[int], tokens_total: int = 2**18, tokens_per_batch: int | None = None
) -> dict[str, float]:
    """A trainer eval hook (train.eval_hooks, docs/eval.md): perplexity at several lengths, logged as
    eval/<name>/ppl@T and eval/<name>/loss@T. Every rank evaluates the same chunks (under ZeRO-3 every rank
    must take part in every forward)."""
    tokens = _validation_prefix(str(ensure_prepared(data)), tokens_total, max(lengths))
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
    model = accelerator.unwrap_model(model)
    results = perplexity_by_length(model, tokens, list(lengths), tokens_per_batch, autocast_dtype=autocast_dtype, progress=False)
    return {f"{metric}@{length}": row[metric] for length, row in results.items() for metric in ("loss", "ppl")}


# --- a checkpoint, end to end ---------------------------------------------------------------------------------
def scaling_overrides(trained: ModelConfig, scaling: ScalingEvalConfig) -> dict:
    """load_model overrides that apply length scaling at evaluation time; the weights are untouched.

    Any rotary checkpoint keeps its encoding and options (FoPE's coefficient settings, a YaRN run's L0) and gains
    the scaling options; L0 is the length the rotary weights were first trained at.
    """
    if scaling.method == ScalingMethod.none:
        return {}
    if not issubclass(get_class(trained.pe), RotaryEncoding):
        raise ConfigError(f"eval-time length scaling rescales rotary encodings; this checkpoint uses {trained.pe!r}, which has none")
    options = {
        "scaling": str(scaling.method),
        "scale": 1.0 if scaling.dynamic or scaling.method == ScalingMethod.abf else scaling.scale,
        "dynamic": scaling.dynamic,
        "original_max_seq_len": original_length(trained),
        "attention_factor": scaling.attention_factor,
        "beta_fast": scaling.beta_fast,
        "beta_slow": scaling.beta_slow,
        "base": scaling.base,
    }
    return {"pe_options": {**trained.pe_options, **options}}


def scaling_record(scaling: ScalingEvalConfig, trained: ModelConfig) -> dict:
    """The eval-time scaling as results.json records it."""
    record = {key: str(value) if key == "method" else value for key, value in vars(scaling).items()}
    return record | {"original_max_seq_len": original_length(trained)}


def original_length(trained: ModelConfig) -> int:
    """L0: the length the rotary weights were first trained at."""
    return trained.pe_options.get("original_max_seq_len") or trained.max_seq_len


def default_label(pe: str, scaling: ScalingEvalConfig) -> str:
    """The PE, plus eval-time scaling: "rope+yarn(dynamic)", "rope+yarn(s=4)", "rope_clip+linear(s=4)", ..."""
    if scaling.method == ScalingMethod.none:
        return pe
    if scaling.method == ScalingMethod.abf:
        return f"{pe}+abf(base={scaling.base:g})"
    return f"{pe}+{scaling.method}({'dynamic' if scaling.dynamic else f's={scaling.scale:g}'})"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available: use device=cpu or device=auto")
    return torch.device(name)


def resolve_autocast(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return AUTOCAST_DTYPES.get(name)  # float32: no autocast


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)"


def evaluate_checkpoint(cfg: EvalConfig) -> dict:
    """Run the protocol on one checkpoint and return the results dict (already checked against the schema)."""
    started = time.perf_counter()
    checkpoint_dir = checkpoints.resolve_checkpoint(cfg.checkpoint)
    trained = checkpoints.read_model_config(checkpoint_dir)
    metadata = checkpoints.checkpoint_metadata(checkpoint_dir)
    train_len = metadata.get("train_seq_len", trained.max_seq_len)
    device = resolve_device(cfg.device)
    autocast_dtype = resolve_autocast(cfg.dtype, device)
    model = checkpoints.load_model(checkpoint_dir, device=device, **scaling_overrides(trained, cfg.scaling))
    data = TokenData(ensure_prepared(cfg.data))
    data.check_vocab(model.config.vocab_size)
    training_fingerprint = metadata.get("data_fingerprint")
    if training_fingerprint not in (None, data.fingerprint):
        logger.warning(
            f"{data.dir} is not the data {checkpoint_dir} was trained on (fingerprint {training_fingerprint[:12]}): "
            "check that both use the same tokenizer"
        )
    label = cfg.label or default_label(trained.pe, cfg.scaling)
    ppl_cfg = cfg.perplexity
    logger.info(f"evaluating {checkpoint_dir} as {label!r} on {data.dir} ({_device_name(device)})")

    perplexity, sliding, tokens_evaluated = [], None, 0
    if ppl_cfg.enabled:
        longest = max(max(ppl_cfg.lengths), ppl_cfg.sliding_window.window or 0)
        validation = ValidationTokens(data, ppl_cfg.tokens_total, longest)
        tokens_evaluated = validation.num_tokens
        common: dict[str, Any] = dict(loss_chunk_tokens=ppl_cfg.loss_chunk_tokens, autocast_dtype=autocast_dtype, progress=cfg.progress)
        if ppl_cfg.per_document:
            by_length = per_document_perplexity(
                model, validation.tokens, ppl_cfg.lengths, ppl_cfg.tokens_per_batch, eos_id=data.eos_id, train_len=train_len, **common
            )
        else:
            by_length = perplexity_by_length(
                model, validation.tokens, ppl_cfg.lengths, ppl_cfg.tokens_per_batch, train_len=train_len, **common
            )
        perplexity = list(by_length.values())
        if (window := ppl_cfg.sliding_window.window) is not None:
            stride = ppl_cfg.sliding_window.stride
            sliding = sliding_window_perplexity(model, validation.tokens, window, stride, ppl_cfg.tokens_per_batch, **common)

    passkey = None
    if cfg.passkey.enabled:
        options = cfg.passkey
        passkey = {
            "trials": options.trials,
            "seed": options.seed,
            "distractors": options.distractors,
            "chance": 1 / (options.distractors + 1),
            "max_new_tokens": options.max_new_tokens,
            "lengths": evaluate_passkey(
                model,
                load_tokenizer(str(data.tokenizer_dir)),
                list(options.lengths),
                trials=options.trials,
                seed=options.seed,
                distractors=options.distractors,
                max_new_tokens=options.max_new_tokens,
                depth_buckets=options.depth_buckets,
                tokens_per_batch=ppl_cfg.tokens_per_batch,
                autocast_dtype=autocast_dtype,
                progress=cfg.progress,
            ),
        }

    results = {
        "format_version": RESULTS_FORMAT_VERSION,
        "label": label,
        "checkpoint": str(checkpoint_dir.resolve()),
        "pe": trained.pe,
        "pe_options": trained.pe_options,
        "eval_pe": model.config.pe,
        "eval_pe_options": model.config.pe_options,
        "eval_scaling": None if cfg.scaling.method == ScalingMethod.none else scaling_record(cfg.scaling, trained),
        "train_seq_len": train_len,
        "step": metadata.get("step"),
        "model": {"config": trained.to_dict(), "n_parameters": model.num_parameters()},
        "data": {
            "dir": str(data.dir.resolve()),
            "name": data.metadata["name"],
            "fingerprint": data.fingerprint,
            "training_fingerprint": training_fingerprint,
            "split": "validation",
            "tokens_available": data.num_tokens("validation"),
            "tokens_evaluated": tokens_evaluated,
        },
        "settings": {
            "tokens_per_batch": ppl_cfg.tokens_per_batch or max(ppl_cfg.lengths),
            "loss_chunk_tokens": ppl_cfg.loss_chunk_tokens,
            "per_document": ppl_cfg.per_document,
            "device": _device_name(device),
            "autocast_dtype": None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
        },
        "perplexity": perplexity,
        "sliding_window": sliding,
        "passkey": passkey,
        "wall_time_s": round(time.perf_counter() - started, 3),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "package_versions": package_versions(),
    }
    validate_results(results)
    return results


# --- outputs ----------------------------------------------------------------------------------------------------
def validate_results(results: dict) -> None:
    """Raise jsonschema.ValidationError unless `results` matches fope_lm/schemas/results.schema.json."""
    jsonschema.validate(results, json.loads(RESULTS_SCHEMA.read_text()))


def output_dir_for(cfg: EvalConfig, results: dict) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return checkpoints.eval_dir(results["checkpoint"]) / re.sub(r"[^A-Za-z0-9._+=-]+", "-", results["label"]).strip("-")


def write_results(results: dict, output_dir: str | Path) -> dict[str, Path]:
    """results.json (schema-checked first), results.csv, results.md and perplexity.png in output_dir."""
    validate_results(results)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": output_dir / "results.json",
        "csv": output_dir / "results.csv",
        "markdown": output_dir / "results.md",
        "plot": output_dir / "perplexity.png",
    }
    checkpoints.write_json_atomic(paths["json"], results)
    report.write_csv(paths["csv"], *report.results_table(results))
    paths["markdown"].write_text(report.results_markdown(results))
    if results["perplexity"]:
        report.plot_perplexity([results], paths["plot"])
    else:
        del paths["plot"]
    return paths


def log_to_wandb(results: dict, wandb_cfg: WandbConfig, output_dir: str | Path) -> None:
    """The same numbers as results.json: a table and a ppl-vs-length line plot (and a passkey one) per run.

    A new wandb run per evaluation, in output_dir; mode as the trainer decides it (offline without credentials).
    """
    run = start_wandb(
        wandb_cfg,
        run_dir=Path(output_dir),
        run_name=results["label"],
        config={key: results[key] for key in ("label", "checkpoint", "step", "pe", "eval_pe", "eval_scaling", "train_seq_len")},
        new_id=True,
    )
    if run is None:  # mode disabled
        return
    import wandb

    headers, rows = report.results_table(results)
    table = wandb.Table(columns=list[str | int](headers), data=rows)
    logged: dict[str, Any] = {"eval/results": table}
    if results["perplexity"]:
        title = f"{results['label']}: perplexity vs length"
        logged["eval/ppl_vs_length"] = wandb.plot.line(table, "length", "ppl", title=title)
    if results["passkey"]:
        logged["eval/passkey_vs_length"] = wandb.plot.line(
            table, "length", "passkey_teacher_forced", title=f"{results['label']}: teacher-forced passkey accuracy"
        )
    run.log(logged)
    for row in results["perplexity"]:
        run.summary[f"eval/ppl@{row['length']}"] = row["ppl"]
    for row in (results["passkey"] or {}).get("lengths", []):
        run.summary[f"eval/passkey_greedy@{row['length']}"] = row["greedy_accuracy"]
        run.summary[f"eval/passkey_teacher_forced@{row['length']}"] = row["teacher_forced_accuracy"]
    run.finish()


def run_evaluation(cfg: EvalConfig) -> tuple[dict, dict[str, Path]]:
    """evaluate_checkpoint, then write the outputs (and log to wandb when enabled); eval.py's body."""
    results = evaluate_checkpoint(cfg)
    paths = write_results(results, output_dir_for(cfg, results))
    if cfg.wandb.enabled:
        log_to_wandb(results, cfg.wandb, paths["json"].parent)
    return results, paths
