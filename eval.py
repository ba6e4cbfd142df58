"""Evaluate a checkpoint: perplexity across context lengths and passkey retrieval (docs/eval.md).

    python eval.py checkpoint=runs/rope-tiny-L128-s0
    python eval.py checkpoint=runs/rope-tiny-L128-s0/checkpoints/step_000800 scaling.method=yarn scaling.dynamic=true
Writes results.json / results.csv / results.md / perplexity.png to output_dir (default <run_dir>/eval/<step_N>/<label>).
"""

import sys

import hydra
from omegaconf import DictConfig

import fope_lm.evaluation.config  # noqa: F401  (registers the `eval_schema` that configs/eval.yaml selects)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from fope_lm.errors import FopeError
    from fope_lm.evaluation import report
    from fope_lm.evaluation.config import EvalConfig
    from fope_lm.evaluation.runner import run_evaluation
    from fope_lm.schema import validated

    try:
        results, paths = run_evaluation(validated(EvalConfig, cfg))
    except FopeError as err:  # a bad checkpoint, data or setting: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(report.markdown_table(*report.results_table(results)))
    print(f"wrote {', '.join(str(path) for path in paths.values())}")


if __name__ == "__main__":
    main()
