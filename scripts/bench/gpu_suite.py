"""The GPU benchmark set in one run, about 4 minutes on one H200: the numbers of docs/benchmarks.md's GPU section.

The benchmark lives in fope_lm/bench/gpu_suite.py (shared with the GPU suite and the tests); `--help` lists its options."""

from fope_lm.bench.gpu_suite import main

if __name__ == "__main__":
    main()
