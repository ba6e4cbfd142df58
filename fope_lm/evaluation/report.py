"""Evaluation results as files: results.json (checked against fope_lm/schemas/results.schema.json), tables and plots
of one run (results.csv / results.md / perplexity.png) and the figures of several (fope_lm/evaluation/compare.py,
scripts/compare_results.py), and the wandb view of one evaluation. Everything reads the results dicts that results.json holds."""

from __future__ import annotations

import csv
import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
from matplotlib.figure import Figure  # no pyplot: no global figure state or GUI backend
from matplotlib.ticker import MaxNLocator, NullLocator

from fope_lm.checkpoint import write_json_atomic
from fope_lm.errors import FopeError
from fope_lm.nn.model import PRESETS
from fope_lm.paths import PACKAGE_ROOT
from fope_lm.tracking import WandbConfig, start_wandb

RESULTS_SCHEMA = PACKAGE_ROOT / "schemas" / "results.schema.json"


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
    """Log-log ppl vs length, one curve per run (by label), a dashed vertical line at each training length; the title
    adds the model, data and training length (`setup_description`)."""
    curves = [Curve(run["label"], [row["length"] for row in run["perplexity"]], [row["ppl"] for row in run["perplexity"]]) for run in runs]
    figure = perplexity_figure(curves, train_lengths=[run["train_seq_len"] for run in runs], title=title, subtitle=setup_description(runs))
    figure.savefig(path, dpi=150, bbox_inches="tight")


# --- figures fit for a paper ----------------------------------------------------------------------------------------
@dataclass
class Curve:
    """One line of a figure: a value per length, and for a group of seeds the sample sd per length (a shaded band)."""

    name: str
    lengths: list[int]
    values: list[float | None]
    sd: list[float | None] | None = None

    def points(self) -> list[tuple[int, float, float | None]]:
        """(length, value, sd) by length, lengths without a value left out."""
        sds = self.sd or [None] * len(self.values)
        points = [(length, value, sd) for length, value, sd in zip(self.lengths, self.values, sds, strict=True) if value is not None]
        return sorted(points, key=lambda point: point[0])


COLOURS = [f"tab:{name}" for name in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
LINESTYLES = ["-", "--", "-.", ":"]


def line_style(index: int) -> dict:
    """A colour and a marker of their own for each of the first 10 curves (told apart in colour and in grey print);
    curves 11-40 reuse them with another line style, so every (colour, marker, line style) differs."""
    return {
        "color": COLOURS[index % len(COLOURS)],
        "marker": MARKERS[index % len(MARKERS)],
        "linestyle": LINESTYLES[(index // len(COLOURS)) % len(LINESTYLES)],
    }


def readable_log_ticks(low: float, high: float, target: int = 5) -> list[float]:
    """At least 3 round ticks within [low, high] (0 < low < high) for a log axis, whatever the range: 1-2-5 (or
    denser) steps per decade over a wide range, evenly spaced round numbers (MaxNLocator) over a narrow one, where
    per-decade ticks would leave one label (curves within a few percent of 1,000 once all showed "1,000")."""
    if not 0 < low < high:
        raise ValueError(f"log ticks need 0 < low < high, got {low}, {high}")
    ticks: list[float] = []
    if high / low >= 3:
        decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        for subs in ((1,), (1, 2, 5), (1, 2, 3, 5, 7), tuple(range(1, 10))):
            ticks = [float(m * 10.0**k) for k in decades for m in subs if low <= m * 10.0**k <= high]
            if len(ticks) >= 3:
                return ticks
    for bins in range(target, 4 * target):
        values = MaxNLocator(nbins=bins, steps=[1, 2, 2.5, 5, 10], min_n_ticks=3).tick_values(low, high)
        ticks = [float(value) for value in values if low <= value <= high]
        if len(ticks) >= 3:
            return ticks
    return ticks


def tick_labels(ticks: list[float]) -> list[str]:
    """Labels with as few decimals as show each tick exactly (so distinct ticks get distinct labels), thousands
    separated: 1,000 / 1,010 / 1,020; 7.5 / 8 / 8.5 shown as 7.5 / 8.0 / 8.5."""
    for decimals in range(7):
        if all(abs(round(tick, decimals) - tick) <= 1e-9 * max(1.0, abs(tick)) for tick in ticks):
            break
    return [f"{tick:,.{decimals}f}" for tick in ticks]


def length_label(length: int) -> str:
    return f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)


def _length_axis(axes, lengths: list[int], train_lengths: list[int]) -> None:
    for index, train_len in enumerate(sorted(set(train_lengths))):
        style = LINESTYLES[1:][index % 3]
        axes.axvline(train_len, color="0.35", linestyle=style, linewidth=1, label=f"training length {train_len}", zorder=1)
    axes.set_xscale("log", base=2)
    axes.set_xticks(lengths, labels=[length_label(length) for length in lengths])
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("evaluation length (tokens)")


def _title(axes, title: str, subtitle: str | None) -> None:
    text = title if not subtitle else f"{title}\n" + "\n".join(textwrap.wrap(subtitle, 90))
    axes.set_title(text, fontsize="medium")


def _plot_curves(axes, curves: list[Curve], *, floor: float = -math.inf, ceiling: float = math.inf) -> list[float]:
    """Each curve a line in its own style, a seed group's +-sd band shaded (clipped to [floor, ceiling]); returns
    every value drawn, bands included, for the axis limits."""
    drawn: list[float] = []
    for index, curve in enumerate(curves):
        points = curve.points()
        if not points:
            continue
        lengths, values = [p[0] for p in points], [p[1] for p in points]
        axes.plot(lengths, values, label=curve.name, linewidth=1.6, markersize=5, zorder=3, **line_style(index))
        drawn += values
        if any(p[2] for p in points):
            lower = [max(floor, value - (sd or 0.0)) for _, value, sd in points]
            upper = [min(ceiling, value + (sd or 0.0)) for _, value, sd in points]
            axes.fill_between(lengths, lower, upper, color=line_style(index)["color"], alpha=0.18, linewidth=0, zorder=2)
            drawn += lower + upper
    return drawn


def perplexity_figure(curves: list[Curve], *, train_lengths: list[int], title: str, subtitle: str | None = None) -> Figure:
    """ppl vs length on log-log axes: each curve its own colour and marker, a shaded +-sd band for a seed group,
    readable y ticks at any range (`readable_log_ticks`), the training length(s) dashed, the legend outside the axes."""
    figure = Figure(figsize=(6.5, 4.5))  # the legend beside it: savefig(bbox_inches="tight") widens the image, not the axes narrower
    axes = figure.subplots()
    drawn = [value for value in _plot_curves(axes, curves) if value > 0]  # a band reaching below 0 has no log position
    lengths = sorted({length for curve in curves for length in curve.lengths})
    _length_axis(axes, lengths, train_lengths)
    axes.set_yscale("log")
    low, high = (min(drawn), max(drawn)) if drawn else (1.0, 10.0)
    if high <= low * (1 + 1e-6):  # flat: a 1% window around the value
        low, high = low / 1.01, high * 1.01
    pad = (high / low) ** 0.06  # 6% of the (log) range on either side: no curve on the frame
    low, high = low / pad, high * pad
    ticks = readable_log_ticks(low, high)
    axes.set_yticks(ticks, labels=tick_labels(ticks))
    axes.yaxis.set_minor_locator(NullLocator())
    axes.set_ylim(low, high)
    axes.set_ylabel("perplexity")
    _title(axes, title, subtitle)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False, fontsize="small")
    return figure


def passkey_figure(
    panels: list[tuple[str, list[Curve]]], *, train_lengths: list[int], chance: float | None, title: str, subtitle: str | None = None
) -> Figure:
    """Passkey accuracy vs length, one panel per score (greedy, teacher-forced), the same style per run as the
    perplexity figure, +-sd bands for seed groups and the teacher-forced chance level dotted."""
    figure = Figure(figsize=(10, 4.2))
    axes_list = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    figure.subplots_adjust(top=0.8, wspace=0.08)  # room for the two-line title above the panels' own
    for axes, (panel_title, curves) in zip(axes_list, panels, strict=True):
        _plot_curves(axes, curves, floor=0.0, ceiling=1.0)
        lengths = sorted({length for curve in curves for length in curve.lengths})
        _length_axis(axes, lengths, train_lengths)
        if chance is not None and "teacher" in panel_title:
            axes.axhline(chance, color="0.5", linestyle=":", linewidth=1, label=f"chance {chance:.2f}")
        axes.set_ylim(-0.03, 1.03)
        axes.set_yticks([0, 0.25, 0.5, 0.75, 1.0], labels=["0", "0.25", "0.5", "0.75", "1"])
        axes.set_title(panel_title, fontsize="medium")
        axes.grid(True, which="major", alpha=0.3)
    axes_list[0].set_ylabel("passkey accuracy")
    figure.suptitle(title if not subtitle else f"{title}\n" + "\n".join(textwrap.wrap(subtitle, 120)), fontsize="medium")
    handles, labels = axes_list[-1].get_legend_handles_labels()
    axes_list[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False, fontsize="small")
    return figure


def model_description(results: dict) -> str:
    """ "60m (d_model 512, 8 layers, 85.1M params)": the preset whose shape the checkpoint's config has (when one
    does), its width and depth, and the parameter count."""
    config, n_parameters = results["model"]["config"], results["model"]["n_parameters"]
    params = f"{n_parameters / 1e6:.1f}M params"
    if "d_model" not in config or "n_layers" not in config:
        return f"model of {params}"
    preset = next((name for name, shape in PRESETS.items() if all(config.get(key) == value for key, value in shape.items())), None)
    shape = f"d_model {config['d_model']}, {config['n_layers']} layers, {params}"
    return f"{preset} ({shape})" if preset else shape


def setup_description(runs: list[dict]) -> str:
    """What the runs are: model(s), data name(s), training length(s) and checkpoint step(s), for a title."""

    def distinct(values) -> str:
        return " / ".join(str(value) for value in dict.fromkeys(values))

    steps = [run["step"] for run in runs if run["step"] is not None]
    parts = [
        distinct(model_description(run) for run in runs),
        f"data {distinct(run['data']['name'] for run in runs)}",
        f"training length {distinct(sorted(run['train_seq_len'] for run in runs))}",
    ]
    if steps:
        parts.append(f"step {distinct(sorted(steps))}")
    return "; ".join(parts)


# --- a results dir ---------------------------------------------------------------------------------------------
def validate_results(results: dict) -> None:
    """Raise jsonschema.ValidationError unless `results` matches fope_lm/schemas/results.schema.json."""
    jsonschema.validate(results, json.loads(RESULTS_SCHEMA.read_text()))


class ResultsError(FopeError):
    """A results.json that is missing, not JSON (torn, hand-edited) or not what the schema describes."""


def load_valid_results(path: str | Path) -> dict:
    """A results.json, or the results.json inside an eval output dir, checked: a ResultsError of one line naming the
    file and what is wrong with it (the JSON error's line and column, or the schema's path and message) instead of a
    traceback further on."""
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
