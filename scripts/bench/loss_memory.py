"""Peak memory (and time) of a training forward + backward with the whole (B*T, V) logits vs the chunked loss.

The benchmark lives in fope_lm/bench/loss_memory.py (shared with the tests); `--help` lists its options."""

from fope_lm.bench.loss_memory import main

if __name__ == "__main__":
    main()
