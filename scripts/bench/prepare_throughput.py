"""prepare_data.py's tokens/s with 1 and 2 workers against the tokenizer's own batch encode, in one run.

The benchmark lives in fope_lm/bench/prepare_throughput.py (shared with the tests); `--help` lists its options."""

from fope_lm.bench.prepare_throughput import main

if __name__ == "__main__":
    main()
