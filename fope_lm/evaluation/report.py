"""Evaluation results as files: results.json (checked against fope_lm/schemas/results.schema.json), tables and plots
of one run (results.csv / results.md / perplexity.png) or several overlaid (scripts/compare_results.py), and the
wandb view of one evaluation. Everything reads the results dicts that results.json holds."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global figure state or GUI backend
from matplotlib.ticker import NullLocator

from fope_lm.checkpoint import write_json_atomic
from fope_lm.errors import FopeError
from fope_lm.paths import PACKAGE_ROOT
from fope_lm.tracking import WandbConfig, start_wandb

RESULTS_SCHEMA = PACKAGE_ROOT / "schemas" / "results.schema.json"


def load_results(path: str | Path) -> dict:
    """A results.json, or the results.json inside an eval output dir."""
    path = Path(path)
    return json.loads((path / "results.json" if path.is_dir() else path).read_text())


def results_table(results: dict) -> tuple[list[str], list[list]]:
    """One row per evaluated length (perplexity and passkey lengths together; None where not evaluated)."""
    perplexity = {row["length"]: row for row in results["perplexity"]}
    passkey = {row["length"]: row for row in (results["passkey"] or {}).get("lengths", [])}
    headers = ["length", "scored_tokens", "loss", "ppl", "passkey_greedy", "passkey_teacher_forced"]
    rows = []
    for length in sorted(perplexity.keys() | passkey.keys()):
        ppl, key = perplexity.get(length, {}), passkey.get(length, {})
        rows.append(
            [
                length,
                ppl.get("scored_tokens"),
                ppl.get("loss"),
                ppl.get("ppl"),
                key.get("greedy_accuracy"),
                key.get("teacher_forced_accuracy"),
            ]
        )
    return headers, rows


def bucket_table(results: dict) -> tuple[list[str], list[list]]:
    """Mean loss per position bucket (columns) at each length (rows)."""
    spans = sorted({(bucket["start"], bucket["end"]) for row in results["perplexity"] for bucket in row["buckets"]})
    headers = ["length"] + [f"[{start},{end})" for start, end in spans]
    rows = []
    for row in results["perplexity"]:
        losses = {(bucket["start"], bucket["end"]): bucket["loss"] for bucket in row["buckets"]}
        rows.append([row["length"]] + [losses.get(span) for span in spans])
    return headers, rows


def comparison_table(runs: list[dict], metric: str = "ppl") -> tuple[list[str], list[list]]:
    """`metric` of each run (columns, by label) at each length (rows)."""
    values = [{row["length"]: row[metric] for row in run["perplexity"]} for run in runs]
    lengths = sorted(set().union(*values))
    headers = ["length"] + [run["label"] for run in runs]
    return headers, [[length] + [by_length.get(length) for by_length in values] for length in lengths]


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
    lines += ["| " + " | ".join(format_value(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: str | Path, headers: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(headers)
        writer.writerows([["" if value is None else value for value in row] for row in rows])


def results_markdown(results: dict) -> str:
    """The run's tables: per length, per position bucket, sliding window and passkey by depth."""
    scaling, data = results["eval_scaling"], results["data"]
    parts = [
        f"# {results['label']}\n",
        f"checkpoint `{results['checkpoint']}`: PE `{results['pe']}`"
        + (f", evaluated with length scaling `{scaling['method']}`" + (" (dynamic)" if scaling["dynamic"] else "") if scaling else "")
        + f", training length {results['train_seq_len']}, data `{data['name']}` (fingerprint {data['fingerprint'][:12]}), "
        f"{data['tokens_evaluated']:,} tokens per length, git {results['git_sha'][:12]}, {results['wall_time_s']:.0f} s\n",
        markdown_table(*results_table(results)),
    ]
    if results["perplexity"]:
        parts += ["\n## Loss by position bucket\n", markdown_table(*bucket_table(results))]
    if window := results["sliding_window"]:
        parts.append(
            f"\nSliding window {window['window']} / stride {window['stride']}: loss {window['loss']:.4f}, "
            f"ppl {window['ppl']:.2f} over {window['scored_tokens']:,} tokens\n"
        )
    if passkey := results["passkey"]:
        bins = [f"[{b['start']:.1f},{b['end']:.1f})" for b in passkey["lengths"][0]["by_depth"]]
        rows = [[row["length"]] + [b["teacher_forced_accuracy"] for b in row["by_depth"]] for row in passkey["lengths"]]
        title = f"Teacher-forced passkey accuracy by depth ({passkey['trials']} trials, chance {passkey['chance']:.2f})"
        parts += [
            f"\n## {title}\n",
            markdown_table(["length"] + bins, rows),
        ]
    return "\n".join(parts)


def plot_perplexity(runs: list[dict], path: str | Path, *, title: str = "Perplexity vs evaluation length") -> None:
    """Log-log ppl vs length, one curve per run, a dashed vertical line at each training length."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    lengths = sorted({row["length"] for run in runs for row in run["perplexity"]})
    for run in runs:
        rows = sorted(run["perplexity"], key=lambda row: row["length"])
        axes.plot([row["length"] for row in rows], [row["ppl"] for row in rows], marker="o", label=run["label"])
    for train_len in sorted({run["train_seq_len"] for run in runs}):
        axes.axvline(train_len, color="0.4", linestyle="--", linewidth=1, label=f"training length {train_len}")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(lengths, labels=[str(length) for length in lengths])
    # ~6 round, geometrically spaced y ticks: a log axis within one decade would otherwise show one or two
    values = [row["ppl"] for run in runs for row in run["perplexity"]]
    y_ticks = sorted({float(f"{value:.2g}") for value in np.geomspace(min(values), max(values), 6)})
    axes.set_yticks(y_ticks, labels=[format_value(tick) for tick in y_ticks])
    axes.xaxis.set_minor_locator(NullLocator())
    axes.yaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("evaluation length (tokens)")
    axes.set_ylabel("perplexity")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=150, bbox_inches="tight")


# --- a results dir ---------------------------------------------------------------------------------------------
def validate_results(results: dict) -> None:
    """Raise jsonschema.ValidationError unless `results` matches fope_lm/schemas/results.schema.json."""
    jsonschema.validate(results, json.loads(RESULTS_SCHEMA.read_text()))


class ResultsError(FopeError):
    """A results.json that is missing, not JSON (torn, hand-edited) or not what the schema describes."""


def load_valid_results(path: str | Path) -> dict:
    """`load_results`, checked: a ResultsError of one line naming the file and what is wrong with it (the JSON error's
    line and column, or the schema's path and message) instead of a traceback further on."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    again = "evaluate the checkpoint again with eval.py"
    if not file.is_file():
        what = f"{path} holds no results.json" if path.is_dir() else f"{path} does not exist"
        raise ResultsError(f"{what}: pass results.json files or the eval output dirs that hold them")
    try:
        results = json.loads(file.read_text())
    except UnicodeDecodeError as exc:
        raise ResultsError(f"{file} is not text ({exc.reason} at byte {exc.start}): {again}") from None
    except json.JSONDecodeError as exc:  # its message names the line and column
        raise ResultsError(f"{file} is not valid JSON ({exc}), a torn or edited file: {again}") from None
    try:
        validate_results(results)
    except jsonschema.ValidationError as exc:
        message = " ".join(exc.message.split())
        message = message if len(message) <= 200 else message[:197] + "..."
        raise ResultsError(f"{file} does not match fope_lm/schemas/{RESULTS_SCHEMA.name} at {exc.json_path}: {message}; {again}") from None
    return results


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
    write_json_atomic(paths["json"], results)
    write_csv(paths["csv"], *results_table(results))
    paths["markdown"].write_text(results_markdown(results))
    if results["perplexity"]:
        plot_perplexity([results], paths["plot"])
    else:
        del paths["plot"]
    return paths


def log_to_wandb(results: dict, wandb_cfg: WandbConfig, output_dir: str | Path) -> None:
    """The same numbers as results.json: a table and a ppl-vs-length line plot (and a passkey one) per run.

    A new wandb run per evaluation, in output_dir; mode as the trainer decides it (offline without credentials).
    """
    run = start_wandb(
        wandb_cfg,
        directory=Path(output_dir),
        id_file=Path(output_dir) / "wandb_id",
        run_name=results["label"],
        config={key: results[key] for key in ("label", "checkpoint", "step", "pe", "eval_pe", "eval_scaling", "train_seq_len")},
        new_id=True,
    )
    if run is None:  # mode disabled
        return
    import wandb

    headers, rows = results_table(results)
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
