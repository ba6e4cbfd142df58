"""Compare several evaluations (e.g. the PEs of a sweep, over seeds) in one table and one figure.

    python scripts/compare_results.py runs/*/eval/step_*/*/results.json --output-dir outputs/compare
    fope-lm compare runs/*/eval/step_*/*/results.json --output-dir outputs/compare

Each argument is a results.json or an eval output dir holding one, checked against fope_lm/schemas/results.schema.json
(a torn or wrong file: one line naming it and what is wrong, exit code 1). Then:

- Comparable or refused: every evaluation must have scored the same tokens the same way: the same data (content
  fingerprint), the same evaluated token prefix (`data.tokens_evaluated`), the same scoring (`settings.per_document`)
  and, where both ran passkey, the same passkey trials, seed, distractors and decode length. Otherwise one line names
  both files and the difference, exit code 1; `--allow-mixed-data` tabulates them anyway, every column then tagged
  with what differs and the table headed by a warning. What does not change the numbers is not checked: the data dir
  (the same data prepared elsewhere), tokens_per_batch and loss_chunk_tokens (chunks are scored independently; only
  float rounding differs). Device and autocast dtype (fp32 vs bf16) change ppl slightly: a note says so when they
  differ.
- Columns are runs: the run dir's name (a checkpoint <run_dir>/checkpoints/step_N), plus the eval label beyond the PE
  (`rope-60m+yarn(dynamic)`) when eval-time scaling or a label changed it; a checkpoint outside a run is named by its
  label. Names that still collide get the step, then the run dir's parent, then #k.
- Seeds: runs that differ only by their training seed are one column, `mean ± sd` (sample sd) with n, and one curve
  with a shaded +-sd band. The seed is the checkpoint's trainer_state.json (its config), else the run's config.yaml,
  else a `_s<N>` / `-s<N>` suffix of the run name; the runs must agree on everything else in results.json (PE and
  options, model, training length, step, data and settings) and their names must be equal without the seed suffix.
- Writes comparison.csv / comparison.md / comparison.png (ppl per length) and, when any run has passkey results,
  comparison_passkey.csv and comparison_passkey.png (greedy and teacher-forced accuracy per length), then prints the
  markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from fope_lm.errors import FopeError
from fope_lm.evaluation import report
from fope_lm.run_dir import RunDir

TRAINER_STATE = "trainer_state.json"  # fope_lm.training.checkpointer.TRAINER_STATE (not imported: it pulls in accelerate)
SEED_SUFFIX = re.compile(r"[-_]s(\d+)$")  # fope_lm.training.config.derive_run_name: `_s1` (or a `{seed}` template's `-s1`)
DEFAULT_TITLE = "Perplexity vs evaluation length"


class MixedDataError(FopeError):
    """Evaluations of different data or protocol settings given to one table."""


# --- one evaluation --------------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """One results.json and what the comparison reads from it and its run: the run's name and training seed."""

    file: Path
    results: dict
    run_dir: Path | None = None
    seed: int | None = None
    seed_source: str | None = None  # "trainer_state.json", "config.yaml" or "run name"

    @classmethod
    def load(cls, path: str | Path) -> Evaluation:
        path = Path(path)
        results = report.load_valid_results(path)
        file = path / "results.json" if path.is_dir() else path
        run = RunDir.of_checkpoint(results["checkpoint"])
        evaluation = cls(file, results, run.path if run is not None else None)
        evaluation.seed, evaluation.seed_source = evaluation._find_seed()
        return evaluation

    @property
    def run_name(self) -> str | None:
        return self.run_dir.name if self.run_dir is not None else None

    @property
    def eval_suffix(self) -> str:
        """What the eval label adds to the trained PE: "+yarn(dynamic)" for `rope+yarn(dynamic)`, " (mine)" for a
        label of another form, "" when the label is the PE (or the run's own name)."""
        label, pe = self.results["label"], self.results["pe"]
        if label in (pe, self.run_name):
            return ""
        return label[len(pe) :] if label.startswith(pe) else f" ({label})"

    @property
    def name(self) -> str:
        """The run's column: run name + eval suffix; outside a run dir, the label."""
        return self.run_name + self.eval_suffix if self.run_name is not None else self.results["label"]

    @property
    def base_name(self) -> str:
        """`name` without the seed suffix: the seeds of one configuration share it."""
        if self.run_name is None:
            return self.results["label"]
        match = SEED_SUFFIX.search(self.run_name)
        if match and (self.seed is None or int(match.group(1)) == self.seed):
            return self.run_name[: match.start()] + self.eval_suffix
        return self.name

    def _find_seed(self) -> tuple[int | None, str | None]:
        """The training seed: the checkpoint's trainer state, else the run's config.yaml (the run dir the checkpoint
        path names, else the one this results.json sits in: <run_dir>/eval/step_N/<label>/results.json), else the
        run name's suffix."""
        state = Path(self.results["checkpoint"]) / TRAINER_STATE
        seed = _read_seed(state, lambda text: json.loads(text).get("config", {}).get("seed"))
        if seed is not None:
            return seed, TRAINER_STATE
        run_dirs = [self.run_dir] if self.run_dir is not None else []
        if len(self.file.parents) > 3 and self.file.parents[2].name == "eval":
            run_dirs.append(self.file.parents[3])
        for run_dir in run_dirs:
            seed = _read_seed(run_dir / "config.yaml", lambda text: (yaml.safe_load(text) or {}).get("seed"))
            if seed is not None:
                return seed, "config.yaml"
        if self.run_name is not None and (match := SEED_SUFFIX.search(self.run_name)):
            return int(match.group(1)), "run name"
        return None, None

    # --- what must match -----------------------------------------------------------------------------------------
    def protocol(self) -> dict[str, Any]:
        """What decides the numbers besides the model: compared between every pair of evaluations in one table (the
        perplexity settings only where there are perplexity rows, passkey's only where passkey ran)."""
        data, settings, passkey = self.results["data"], self.results["settings"], self.results["passkey"]
        protocol: dict[str, Any] = {"data": data["fingerprint"]}
        if self.results["perplexity"]:
            protocol["tokens_evaluated"] = data["tokens_evaluated"]
            protocol["per_document"] = settings.get("per_document", False)
        if passkey is not None:
            protocol["passkey"] = (passkey["trials"], passkey["seed"], passkey["distractors"], passkey["max_new_tokens"])
        return protocol

    def describe(self, key: str) -> str:
        data, passkey = self.results["data"], self.results["passkey"]
        if key == "data":
            return f"{data['name']} (fingerprint {data['fingerprint'][:12]}, {data['dir']})"
        if key == "tokens_evaluated":
            return f"{data['tokens_evaluated']:,} tokens"
        if key == "per_document":
            return "per document" if self.protocol()["per_document"] else "joined documents"
        trials, seed, distractors, new_tokens = (passkey[key] for key in ("trials", "seed", "distractors", "max_new_tokens"))
        return f"{trials} trials, seed {seed}, {distractors} distractors, {new_tokens} new tokens"

    def tag(self, key: str) -> str | None:
        """A short form of `describe` for a column name; None where this evaluation has no such setting."""
        data, protocol = self.results["data"], self.protocol()
        if key not in protocol:
            return None
        if key == "data":
            return f"{data['name']} {data['fingerprint'][:8]}"
        if key == "tokens_evaluated":
            return f"{data['tokens_evaluated']:,} tok"
        if key == "per_document":
            return "per-doc" if protocol["per_document"] else "joined"
        return "passkey " + "/".join(map(str, protocol["passkey"]))

    def precision(self) -> str:
        settings = self.results["settings"]
        return f"{settings['device']} {settings['autocast_dtype'] or 'fp32'}"

    def grouping_key(self) -> str:
        """Everything but the seed: evaluations with equal keys and distinct seeds are one configuration's seeds."""
        results = self.results
        same = {
            "name": self.base_name,
            "label": results["label"],
            **{key: results[key] for key in ("pe", "pe_options", "eval_pe", "eval_pe_options", "eval_scaling", "train_seq_len", "step")},
            "model": results["model"]["config"],
            "protocol": self.protocol(),
            "precision": self.precision(),
        }
        return json.dumps(same, sort_keys=True, default=str)


def _read_seed(path: Path, parse) -> int | None:
    try:
        seed = parse(path.read_text())
    except (OSError, ValueError, AttributeError, yaml.YAMLError):  # absent (results copied off the cluster), unreadable
        return None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def check_comparable(evaluations: list[Evaluation]) -> None:
    """Raise MixedDataError, one line naming the first two files that differ and every difference, unless all
    evaluations share the protocol (`Evaluation.protocol`: a setting only between two that have it)."""
    for index, first in enumerate(evaluations):
        for other in evaluations[index + 1 :]:
            a, b = first.protocol(), other.protocol()
            keys = [key for key in WHAT if key in a and key in b and a[key] != b[key]]
            if keys:
                what = "; ".join(f"{WHAT[key]}: {first.describe(key)} vs {other.describe(key)}" for key in keys)
                raise MixedDataError(
                    f"{first.file} and {other.file} are not comparable ({what}): compare evaluations of one dataset and "
                    "protocol, or pass --allow-mixed-data to tabulate them anyway (the table then says so)"
                )


WHAT = {"data": "data", "tokens_evaluated": "evaluated token prefix", "per_document": "scoring", "passkey": "passkey settings"}


def find_mixed(evaluations: list[Evaluation]) -> dict[str, set[str]]:
    """{protocol key: the distinct values' descriptions} for every key on which the evaluations differ (a setting
    only among those that have it)."""
    mixed = {}
    for key in WHAT:
        having = [evaluation for evaluation in evaluations if key in evaluation.protocol()]
        if len({json.dumps(evaluation.protocol()[key]) for evaluation in having}) > 1:
            mixed[key] = {evaluation.describe(key) for evaluation in having}
    return mixed


# --- columns ---------------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    mean: float | None
    sd: float | None  # sample sd (n - 1) over seeds; None for one value
    n: int


@dataclass
class Column:
    """One run, or the seeds of one configuration."""

    name: str
    members: list[Evaluation] = field(default_factory=list)

    @property
    def seeds(self) -> list[int | None]:
        return [member.seed for member in self.members]

    @property
    def is_group(self) -> bool:
        return len(self.members) > 1

    def cell(self, values: list[float | None]) -> Cell:
        present = [value for value in values if value is not None]
        if not present:
            return Cell(None, None, 0)
        return Cell(statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None, len(present))

    def ppl(self, length: int) -> Cell:
        return self.cell([{row["length"]: row["ppl"] for row in m.results["perplexity"]}.get(length) for m in self.members])

    def passkey(self, length: int, score: str) -> Cell:
        values = []
        for member in self.members:
            rows = {row["length"]: row for row in (member.results["passkey"] or {}).get("lengths", [])}
            values.append(rows[length][score] if length in rows else None)
        return self.cell(values)


def build_columns(evaluations: list[Evaluation], mixed: dict[str, set[str]] | None = None) -> list[Column]:
    """One column per run, the seeds of one configuration merged (`Evaluation.grouping_key`, distinct known seeds);
    names made unique; with mixed protocols each name tagged with its own values of what differs."""
    by_key: dict[str, list[Evaluation]] = {}
    for evaluation in evaluations:
        by_key.setdefault(evaluation.grouping_key(), []).append(evaluation)
    for members in by_key.values():  # derive_run_name's seed 0 is the bare name: `rope`, `rope_s1`, `rope_s2`
        bare = [member for member in members if member.seed is None and member.run_name is not None]
        named = [member for member in members if member.seed_source == "run name"]
        if len(bare) == 1 and named and 0 not in {member.seed for member in named}:
            bare[0].seed, bare[0].seed_source = 0, "run name"
    columns: list[Column] = []
    placed: set[int] = set()
    for evaluation in evaluations:
        if id(evaluation) in placed:
            continue
        members = by_key[evaluation.grouping_key()]
        seeds = [member.seed for member in members]
        if len(members) > 1 and None not in seeds and len(set(seeds)) == len(seeds):
            columns.append(Column(evaluation.base_name, sorted(members, key=lambda member: member.seed or 0)))
            placed.update(id(member) for member in members)
        else:
            columns.append(Column(evaluation.name, [evaluation]))
            placed.add(id(evaluation))
    for column in columns:
        tags = [tag for key in mixed or {} if (tag := column.members[0].tag(key)) is not None]
        if tags:
            column.name += " [" + ", ".join(tags) + "]"
    _make_unique(columns)
    return columns


def _make_unique(columns: list[Column]) -> None:
    """Colliding names get the step, then the run dir's parent, then #k. The very same evaluation given twice (equal
    results) keeps its name: the columns are identical."""
    qualifiers = [
        lambda column, name: f"{name}@{column.members[0].results['step']}",
        lambda column, name: f"{column.members[0].run_dir.parent.name}/{name}" if column.members[0].run_dir else name,
    ]
    for qualify in [*qualifiers, None]:
        clashes: dict[str, list[Column]] = {}
        for column in columns:
            clashes.setdefault(column.name, []).append(column)
        for clash in clashes.values():
            if len(clash) < 2 or all(not c.is_group and c.members[0].results == clash[0].members[0].results for c in clash):
                continue
            if qualify is None:
                for index, column in enumerate(clash[1:], start=2):
                    column.name = f"{column.name} #{index}"
                continue
            names = [qualify(column, column.name) for column in clash]
            if len(set(names)) > 1:  # this qualifier tells at least some of them apart
                for column, name in zip(clash, names, strict=True):
                    column.name = name


# --- tables ----------------------------------------------------------------------------------------------------------
def format_cell(cell: Cell, members: int) -> str:
    """A run's value as `report.format_value` writes it; a seed group's `mean ± sd`, both to the sd's precision (two
    significant digits of the sd: 110 ± 10, 0.60 ± 0.14), with n when some seeds lack the length."""
    if cell.mean is None:
        return "-"
    if members == 1:
        return report.format_value(cell.mean)
    if not cell.sd:  # one value at this length, or all equal
        text = report.format_value(cell.mean) + " ± " + ("-" if cell.sd is None else "0")
    else:
        decimals = sd_decimals(cell.sd)
        text = f"{cell.mean:,.{decimals}f} ± {cell.sd:,.{decimals}f}"
    return text + (f" (n={cell.n})" if cell.n != members else "")


def sd_decimals(sd: float) -> int:
    """Decimals that show two significant digits of sd: 1 for 1.3, 3 for 0.042, 0 for 120."""
    return max(0, 1 - math.floor(math.log10(abs(sd))))


def column_header(column: Column) -> str:
    return f"{column.name} (n={len(column.members)})" if column.is_group else column.name


def ppl_lengths(columns: list[Column]) -> list[int]:
    return sorted({row["length"] for column in columns for m in column.members for row in m.results["perplexity"]})


def passkey_lengths(columns: list[Column]) -> list[int]:
    return sorted({row["length"] for c in columns for m in c.members for row in (m.results["passkey"] or {}).get("lengths", [])})


def ppl_table(columns: list[Column]) -> tuple[list[str], list[list]]:
    """Markdown cells: length, then each column's ppl (mean ± sd for a seed group)."""
    headers = ["length"] + [column_header(column) for column in columns]
    rows = [[length] + [format_cell(c.ppl(length), len(c.members)) for c in columns] for length in ppl_lengths(columns)]
    return headers, rows


def csv_headers(columns: list[Column]) -> list[str]:
    """The numeric CSVs' value columns: a run's value; a seed group's mean, `_sd` and `_n`."""
    headers: list[str] = []
    for column in columns:
        headers += [column.name, f"{column.name}_sd", f"{column.name}_n"] if column.is_group else [column.name]
    return headers


def csv_row(columns: list[Column], cells: list[Cell]) -> list:
    row: list = []
    for column, cell in zip(columns, cells, strict=True):
        row += [cell.mean, cell.sd, cell.n] if column.is_group else [cell.mean]
    return row


def ppl_csv(columns: list[Column]) -> tuple[list[str], list[list]]:
    rows = [[length, *csv_row(columns, [c.ppl(length) for c in columns])] for length in ppl_lengths(columns)]
    return ["length", *csv_headers(columns)], rows


SCORES = {"greedy_accuracy": "greedy", "teacher_forced_accuracy": "teacher-forced"}


def passkey_csv(columns: list[Column]) -> tuple[list[str], list[list]]:
    """length, score (greedy / teacher_forced), then each column's accuracy (a seed group's mean, _sd, _n)."""
    rows = [
        [length, score.removesuffix("_accuracy"), *csv_row(columns, [c.passkey(length, score) for c in columns])]
        for length in passkey_lengths(columns)
        for score in SCORES
    ]
    return ["length", "score", *csv_headers(columns)], rows


def passkey_table(columns: list[Column], score: str) -> tuple[list[str], list[list]]:
    with_passkey = [column for column in columns if any(m.results["passkey"] for m in column.members)]
    headers = ["length"] + [column_header(column) for column in with_passkey]
    rows = [[length] + [format_cell(c.passkey(length, score), len(c.members)) for c in with_passkey] for length in passkey_lengths(columns)]
    return headers, rows


def notes(columns: list[Column], evaluations: list[Evaluation], mixed: dict[str, set[str]]) -> list[str]:
    """The lines above the tables: mixed protocols, seed groups, precision differences."""
    lines = []
    if mixed:
        what = "; ".join(f"{WHAT[key]}: {' vs '.join(sorted(values))}" for key, values in mixed.items())
        lines.append(f"**Warning: mixed data or evaluation settings (--allow-mixed-data), columns are not comparable**: {what}.")
    groups = [column for column in columns if column.is_group]
    if groups:
        seeds = "; ".join(
            f"`{column.name}` seeds {', '.join(map(str, column.seeds))} ({', '.join(sorted({str(m.seed_source) for m in column.members}))})"
            for column in groups
        )
        lines.append(f"Seed groups, mean ± sample sd (n - 1) over the seeds, n in the header: {seeds}.")
    precisions = {evaluation.precision() for evaluation in evaluations}
    if len(precisions) > 1:
        lines.append(
            f"Evaluated at different precisions ({', '.join(sorted(precisions))}): bf16 autocast moves ppl by up to about 1%, "
            "so differences that small between those columns may be the precision's."
        )
    return lines


def markdown(columns: list[Column], evaluations: list[Evaluation], mixed: dict[str, set[str]], title: str) -> str:
    runs = [evaluation.results for evaluation in evaluations]
    parts = [f"# {title}\n", report.setup_description(runs) + "\n"]
    parts += [line + "\n" for line in notes(columns, evaluations, mixed)]
    if any(run["perplexity"] for run in runs):
        parts += ["## Perplexity\n", report.markdown_table(*ppl_table(columns))]
    if any(run["passkey"] for run in runs):
        chance = sorted({f"{run['passkey']['chance']:.2f}" for run in runs if run["passkey"]})
        parts += ["## Passkey retrieval: greedy accuracy\n", report.markdown_table(*passkey_table(columns, "greedy_accuracy"))]
        parts += [
            f"## Passkey retrieval: teacher-forced accuracy (chance {' / '.join(chance)})\n",
            report.markdown_table(*passkey_table(columns, "teacher_forced_accuracy")),
        ]
    return "\n".join(parts)


# --- figures ---------------------------------------------------------------------------------------------------------
def curve_name(column: Column) -> str:
    return f"{column.name} (mean ± sd, n={len(column.members)})" if column.is_group else column.name


def ppl_curves(columns: list[Column]) -> list[report.Curve]:
    curves = []
    for column in columns:
        lengths = [length for length in ppl_lengths([column]) if column.ppl(length).mean is not None]
        cells = [column.ppl(length) for length in lengths]
        sd = [cell.sd for cell in cells] if column.is_group else None
        curves.append(report.Curve(curve_name(column), lengths, [cell.mean for cell in cells], sd))
    return curves


def passkey_curves(columns: list[Column], score: str) -> list[report.Curve]:
    curves = []
    for column in columns:
        lengths = [length for length in passkey_lengths([column]) if column.passkey(length, score).mean is not None]
        cells = [column.passkey(length, score) for length in lengths]
        sd = [cell.sd for cell in cells] if column.is_group else None
        curves.append(report.Curve(curve_name(column), lengths, [cell.mean for cell in cells], sd))
    return curves


def figure_title(title: str, mixed: dict[str, set[str]]) -> str:
    return title + (" (MIXED data/settings: not comparable)" if mixed else "")


def ppl_figure(columns: list[Column], evaluations: list[Evaluation], title: str, mixed: dict[str, set[str]]) -> Figure:
    """comparison.png: one curve per column (seed groups with a +-sd band), titled with the model, data and length."""
    runs = [evaluation.results for evaluation in evaluations]
    return report.perplexity_figure(
        ppl_curves(columns),
        train_lengths=[run["train_seq_len"] for run in runs],
        title=figure_title(title, mixed),
        subtitle=report.setup_description(runs),
    )


# --- the command -----------------------------------------------------------------------------------------------------
def compare(paths: list[str], output_dir: str | Path, *, title: str = DEFAULT_TITLE, allow_mixed_data: bool = False) -> dict[str, Path]:
    """Load, check and tabulate; write the files. FopeError (one line) for a bad file or mixed data."""
    evaluations = [Evaluation.load(path) for path in paths]
    if not any(evaluation.results["perplexity"] for evaluation in evaluations):
        raise FopeError("none of the results has perplexity rows (perplexity.enabled=false): nothing to plot or tabulate")
    if not allow_mixed_data:
        check_comparable(evaluations)
    mixed = find_mixed(evaluations)
    columns = build_columns(evaluations, mixed)
    runs = [evaluation.results for evaluation in evaluations]
    train_lengths = [run["train_seq_len"] for run in runs]
    subtitle = report.setup_description(runs)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths_out = {"csv": output_dir / "comparison.csv", "markdown": output_dir / "comparison.md", "plot": output_dir / "comparison.png"}
    report.write_csv(paths_out["csv"], *ppl_csv(columns))
    paths_out["markdown"].write_text(markdown(columns, evaluations, mixed, title))
    ppl_figure(columns, evaluations, title, mixed).savefig(paths_out["plot"], dpi=150, bbox_inches="tight")
    if any(run["passkey"] for run in runs):
        with_passkey = [column for column in columns if any(m.results["passkey"] for m in column.members)]
        chances = {run["passkey"]["chance"] for run in runs if run["passkey"]}
        panels = [(f"passkey: {name} accuracy", passkey_curves(with_passkey, score)) for score, name in SCORES.items()]
        passkey_title = figure_title("Passkey retrieval vs evaluation length", mixed)
        figure = report.passkey_figure(
            panels, train_lengths=train_lengths, chance=chances.pop() if len(chances) == 1 else None, title=passkey_title, subtitle=subtitle
        )
        paths_out["passkey_plot"] = output_dir / "comparison_passkey.png"
        figure.savefig(paths_out["passkey_plot"], dpi=150, bbox_inches="tight")
        paths_out["passkey_csv"] = output_dir / "comparison_passkey.csv"
        report.write_csv(paths_out["passkey_csv"], *passkey_csv(columns))
    return paths_out


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files or eval output dirs")
    parser.add_argument("--output-dir", default="outputs/compare", help="where the plot and tables go")
    parser.add_argument("--title", default=DEFAULT_TITLE, help="the figure's and table's first line (model, data and length follow)")
    parser.add_argument(
        "--allow-mixed-data",
        action="store_true",
        help="tabulate evaluations of different data or protocol settings anyway (columns tagged, the table warns)",
    )
    args = parser.parse_args(argv)
    try:  # every file checked first: one line naming a torn or wrong file, or the two that are not comparable
        written = compare(args.results, args.output_dir, title=args.title, allow_mixed_data=args.allow_mixed_data)
    except FopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(written["markdown"].read_text())
    print("wrote " + ", ".join(str(path) for path in written.values()))
    return 0
