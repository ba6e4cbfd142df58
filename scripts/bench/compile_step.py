"""The compiled train step against eager, graph counts per PE, and activation checkpointing's memory, in one run.

The benchmark lives in fope_lm/bench/compile_step.py (shared with the tests); `--help` lists its options."""

from fope_lm.bench.compile_step import main

if __name__ == "__main__":
    main()
