"""Eval at long lengths: peak memory and time per token for T = 1k ... 16k, per position encoding, in one run.

The benchmark lives in fope_lm/bench/eval_memory.py (shared with the GPU suite and the tests); `--help` lists its options."""

from fope_lm.bench.eval_memory import main

if __name__ == "__main__":
    main()
