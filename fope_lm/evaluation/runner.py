"""eval.py's job: one checkpoint -> the evaluation protocol of docs/eval.md (perplexity across lengths, passkey
retrieval, optional eval-time length scaling) -> a results dir (results.json checked against its schema, a CSV, a
markdown table, a plot; wandb when enabled)."""

from __future__ import annotations

import datetime
import logging
import re
import time
from pathlib import Path
from typing import Any

from fope_lm.checkpoint import checkpoint_metadata, load_model, read_model_config
from fope_lm.data import DataConfig, TokenData, ValidationTokens, load_tokenizer
from fope_lm.data.format import is_prepared
from fope_lm.devices import device_name, resolve_autocast, resolve_device
from fope_lm.errors import DataError
from fope_lm.evaluation import report
from fope_lm.evaluation.config import EvalConfig
from fope_lm.evaluation.passkey import check_lengths, evaluate_passkey
from fope_lm.evaluation.perplexity import per_document_perplexity, perplexity_by_length, sliding_window_perplexity
from fope_lm.provenance import git_sha, package_versions
from fope_lm.run_dir import eval_dir, recorded_data_dir, resolve_checkpoint

logger = logging.getLogger(__name__)

RESULTS_FORMAT_VERSION = 2  # 2: eval_scaling (any method) replaced eval_yarn


def evaluate_checkpoint(cfg: EvalConfig) -> dict:
    """Run the protocol on one checkpoint and return the results dict (already checked against the schema)."""
    started = time.perf_counter()
    checkpoint_dir = resolve_checkpoint(cfg.checkpoint)
    trained = read_model_config(checkpoint_dir)
    metadata = checkpoint_metadata(checkpoint_dir)
    train_len = metadata.get("train_seq_len", trained.max_seq_len)
    device = resolve_device(cfg.device)
    autocast_dtype = resolve_autocast(cfg.dtype, device)
    encoding = trained.pe_spec.with_eval_scaling(cfg.scaling, max_seq_len=trained.max_seq_len)
    model = load_model(checkpoint_dir, device=device, pe_options=encoding.options)
    model.set_attention(cfg.attention, device)
    training_fingerprint = metadata.get("data_fingerprint")
    data, data_source = eval_data(cfg, checkpoint_dir, training_fingerprint)
    data.check_vocab(model.config.vocab_size)
    tokenizer = None
    if cfg.passkey.enabled:  # lengths too short for the prompt fail now, not after every perplexity length has run
        tokenizer = load_tokenizer(str(data.tokenizer_dir))
        check_lengths(tokenizer, cfg.passkey.lengths, trials=cfg.passkey.trials, seed=cfg.passkey.seed, distractors=cfg.passkey.distractors)
    label = cfg.label or encoding.label()
    ppl_cfg = cfg.perplexity
    logger.info(f"evaluating {checkpoint_dir} as {label!r} on {data.dir} ({device_name(device)})")

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
                tokenizer,
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
        "eval_scaling": None if encoding.eval_scaling is None else encoding.eval_scaling.record(),
        "train_seq_len": train_len,
        "step": metadata.get("step"),
        "model": {"config": trained.to_dict(), "n_parameters": model.num_parameters()},
        "data": {
            "dir": str(data.dir.resolve()),
            "name": data.metadata["name"],
            "fingerprint": data.fingerprint,
            "training_fingerprint": training_fingerprint,
            "source": data_source,
            "split": "validation",
            "tokens_available": data.num_tokens("validation"),
            "tokens_evaluated": tokens_evaluated,
        },
        "settings": {
            "tokens_per_batch": ppl_cfg.tokens_per_batch or max(ppl_cfg.lengths),
            "loss_chunk_tokens": ppl_cfg.loss_chunk_tokens,
            "per_document": ppl_cfg.per_document,
            "device": device_name(device),
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
    report.validate_results(results)
    return results


def eval_data(cfg: EvalConfig, checkpoint_dir: Path, training_fingerprint: str | None) -> tuple[TokenData, str]:
    """(the data to evaluate on, where the choice came from): "checkpoint", the data dir the checkpoint records
    (`recorded_data_dir`: its metadata, else its run's run_info.json), unless `cfg.data` names other data ("config":
    data=<name> or data.dir=PATH)."""
    if not cfg.checkpoint_data:
        data = TokenData.from_config(cfg.data)
        if training_fingerprint not in (None, data.fingerprint):
            logger.warning(
                f"{data.dir} is not the data {checkpoint_dir} was trained on (fingerprint {training_fingerprint[:12]}): "
                "check that both use the same tokenizer"
            )
        return data, "config"
    point = "point eval at the data with data.dir=/path/to/prepared/dir (or data=<name of a configs/data/*.yaml>)"
    if (recorded := recorded_data_dir(checkpoint_dir)) is None:
        raise DataError(
            f"{checkpoint_dir} does not record the data it was trained on (neither its metadata nor its run's "
            f"run_info.json names a data dir): {point}"
        )
    data_dir, named_in = recorded
    if not is_prepared(Path(data_dir)):
        gone = "holds no metadata.json" if Path(data_dir).is_dir() else "no longer exists"
        raise DataError(f"{data_dir}, the data {checkpoint_dir} was trained on (named in {named_in}), {gone}: {point}")
    data = TokenData.from_config(DataConfig.of_prepared_dir(data_dir))
    if training_fingerprint not in (None, data.fingerprint):
        raise DataError(
            f"{data_dir}, the data {checkpoint_dir} was trained on (named in {named_in}), has fingerprint {data.fingerprint[:12]}, "
            f"the checkpoint records {training_fingerprint[:12]}: it was re-prepared since; {point}, or data.dir={data_dir} "
            "to evaluate it as it is now"
        )
    return data, "checkpoint"


def output_dir_for(cfg: EvalConfig, results: dict) -> Path:
    """output_dir, else <run_dir>/eval/step_N/<label> for a run's checkpoint (<checkpoint>/eval/<label> outside a run)."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return eval_dir(results["checkpoint"]) / re.sub(r"[^A-Za-z0-9._+=-]+", "-", results["label"]).strip("-")


def run_evaluation(cfg: EvalConfig) -> tuple[dict, dict[str, Path]]:
    """evaluate_checkpoint, then write the outputs (and log to wandb when enabled); eval.py's body."""
    results = evaluate_checkpoint(cfg)
    paths = report.write_results(results, output_dir_for(cfg, results))
    if cfg.wandb.enabled:
        report.log_to_wandb(results, cfg.wandb, paths["json"].parent)
    return results, paths
