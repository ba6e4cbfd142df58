"""Benchmarks behind scripts/bench/*.py, in the package so that the GPU suite, the scripts and the tests share them.
Each reports ratios measured side by side in one run; nothing asserts on speed."""
