"""Evaluate a checkpoint: perplexity across context lengths and passkey retrieval (docs/eval.md).

    python eval.py checkpoint=runs/rope-tiny-L128-s0
    python eval.py checkpoint=runs/rope-tiny-L128-s0/checkpoints/step_000800 scaling.method=yarn scaling.dynamic=true
Writes results.json / results.csv / results.md / perplexity.png to output_dir (default <run_dir>/eval/<step_N>/<label>).
The same as `fope-lm eval checkpoint=...` (fope_lm/cli.py, which holds the code; configs: fope_lm.paths.CONFIG_DIR).
"""

import sys

from fope_lm.cli import evaluate

if __name__ == "__main__":
    sys.exit(evaluate(sys.argv[1:]))
