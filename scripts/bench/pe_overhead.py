"""FoPE vs RoPE train-step time on the same model, measured side by side in one run.

The benchmark lives in fope_lm/bench/pe_overhead.py (shared with the GPU suite and the tests); `--help` lists its options."""

from fope_lm.bench.pe_overhead import main

if __name__ == "__main__":
    main()
