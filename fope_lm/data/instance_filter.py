"""OLMo's training instance filter: an instance whose tokens contain one n-gram repeated many times in a row (a run
of `max_count` or more copies of a period of `min_period` .. `max_period` tokens) is left out of the loss.

OLMo (`InstanceFilterConfig`: repetition_max_period 13, repetition_min_period 1, repetition_max_count 32, used by
the FoPE paper's configs) masks such instances in the loss rather than dropping them from the data order, so the
batch shapes, the data position and a resumed run's batches stay what they would be without the filter; this does
the same. A run of period p is a stretch where x[i] == x[i + p] holds for consecutive i; r such i span r + p tokens,
which is floor((r + p) / p) whole copies of the period.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RepetitionFilter:
    max_period: int = 13
    min_period: int = 1
    max_count: int = 32

    def __post_init__(self):
        if not 1 <= self.min_period <= self.max_period:
            raise ValueError(f"repetition periods must satisfy 1 <= min_period <= max_period, got {self.min_period}, {self.max_period}")
        if self.max_count < 2:
            raise ValueError(f"repetition_max_count must be at least 2, got {self.max_count}")

    def max_repeats(self, tokens: np.ndarray) -> int:
        """The largest number of consecutive copies of any period in [min_period, max_period] within `tokens` (1-D)."""
        tokens = np.asarray(tokens)
        best = 1
        for period in range(self.min_period, min(self.max_period, tokens.size - 1) + 1):
            same = tokens[period:] == tokens[:-period]  # same[i]: x[i] == x[i + period]
            run = _longest_true_run(same)
            if run:
                best = max(best, (run + period) // period)
        return best

    def keep(self, rows: np.ndarray) -> np.ndarray:
        """Boolean (n,): True for the rows (n, T) to train on, False for those with max_count or more repeats."""
        return np.array([self.max_repeats(row) < self.max_count for row in np.asarray(rows)], dtype=bool)


def _longest_true_run(mask: np.ndarray) -> int:
    """Length of the longest stretch of consecutive True values."""
    if not mask.any():
        return 0
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return int((ends - starts).max())
