"""Helpers shared by the test modules (importable because tests/ is on sys.path); no test module imports another."""
