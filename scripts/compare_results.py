"""Compare evaluations (e.g. the PEs of a sweep, over seeds): one perplexity table and figure, passkey when present.

    python scripts/compare_results.py runs/*/eval/step_*/*/results.json --output-dir outputs/compare
Each argument is a results.json or an eval output dir holding one. Evaluations of different data or protocol settings
are refused in one line (--allow-mixed-data overrides; the table then says so); columns are runs, seeds of one
configuration merged into mean ± sd. The logic and its full description: fope_lm/evaluation/compare.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

from fope_lm.evaluation import compare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return compare.main(argv)


if __name__ == "__main__":
    sys.exit(main())
