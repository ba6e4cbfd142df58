"""Overlay several evaluations (e.g. the five PEs of a sweep) in one perplexity plot and one table.

    python scripts/compare_results.py runs/*/eval/step_*/*/results.json --output-dir outputs/compare
Each argument is a results.json or an eval output dir holding one, checked against fope_lm/schemas/results.schema.json
(a torn or wrong file: one line naming it and what is wrong, exit code 1). Writes comparison.png, comparison.csv and
comparison.md to --output-dir and prints the markdown table (ppl per length, one column per run).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

from fope_lm.errors import FopeError  # noqa: E402
from fope_lm.evaluation import report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files or eval output dirs")
    parser.add_argument("--output-dir", default="outputs/compare", help="where the plot and tables go")
    parser.add_argument("--title", default="Perplexity vs evaluation length")
    args = parser.parse_args(argv)

    try:  # every file checked against the schema first: one line naming a torn or wrong file, no traceback
        runs = [report.load_valid_results(path) for path in args.results]
    except FopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not any(run["perplexity"] for run in runs):
        print("error: none of the results has perplexity rows (perplexity.enabled=false): nothing to plot or tabulate", file=sys.stderr)
        return 1
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    headers, rows = report.comparison_table(runs)
    report.write_csv(output_dir / "comparison.csv", headers, rows)
    table = report.markdown_table(headers, rows)
    title = f"Perplexity per evaluation length (training length {_train_lengths(runs)})"
    (output_dir / "comparison.md").write_text(f"{title}\n\n{table}")
    report.plot_perplexity(runs, output_dir / "comparison.png", title=args.title)
    print(table)
    print(f"wrote {output_dir / 'comparison.png'}, {output_dir / 'comparison.csv'}, {output_dir / 'comparison.md'}")
    return 0


def _train_lengths(runs: list[dict]) -> str:
    return ", ".join(str(length) for length in sorted({run["train_seq_len"] for run in runs}))


if __name__ == "__main__":
    sys.exit(main())
