"""Train-step time of our presets against transformers' OlmoForCausalLM with the same matmul shapes.

The benchmark lives in fope_lm/bench/step_vs_hf.py (shared with the GPU suite and the tests); `--help` lists its options."""

from fope_lm.bench.step_vs_hf import main

if __name__ == "__main__":
    main()
