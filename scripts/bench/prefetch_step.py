"""The train step with its next batch prepared on a background thread vs on the step's own thread, interleaved, and
the host cost of preparing a batch (read, instance filter, documents).

The benchmark lives in fope_lm/bench/prefetch_step.py (shared with the tests); `--help` lists its options."""

from fope_lm.bench.prefetch_step import main

if __name__ == "__main__":
    main()
