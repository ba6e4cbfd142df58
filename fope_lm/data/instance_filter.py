"""OLMo's training instance filter: an instance whose tokens contain one n-gram repeated many times in a row (a run
of `max_count` or more copies of a period of `min_period` .. `max_period` tokens) is left out of the loss.

OLMo (`InstanceFilterConfig`: repetition_max_period 13, repetition_min_period 1, repetition_max_count 32, used by
the FoPE paper's configs) masks such instances in the loss rather than dropping them from the data order, so the
batch shapes, the data position and a resumed run's batches stay what they would be without the filter; this does
the same. A run of period p is a stretch where x[i] == x[i + p] holds for consecutive i; r such i span r + p tokens,
which is floor((r + p) / p) whole copies of the period.

What is filtered is OLMo's instance: the seq_len tokens the model reads. OLMo's dataset returns instances of seq_len
tokens and the labels are the instance shifted inside it; our trainer holds rows of seq_len + 1 tokens (the inputs
row[:-1] plus one label token), so `keep(rows)` looks at row[:-1] only and `keep_instances` takes instances as OLMo
has them. The reference: allenai/OLMo olmo/data/memmap_dataset.py `MemMapDataset._validate_instance` (the same in
OLMo-core's src/olmo_core/data/numpy_dataset.py `NumpyDatasetBase._validate_instance`).
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
        # OLMo's find_periodic_sequences (allenai/OLMo olmo/data/util.py) yields only runs of more than 2 copies
        # (`if out.times > 2`), so its filter never sees a run of 2: below 3 OLMo and a direct count would differ.
        if self.max_count < 3:
            raise ValueError(
                f"repetition_max_count must be at least 3 (OLMo only detects runs of 3 or more copies), got "
                f"{self.max_count}: set repetition_max_count=3 or more (OLMo's default is 32)"
            )

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

    def keep_instances(self, instances: np.ndarray) -> np.ndarray:
        """Boolean (n,): True for the instances (n, seq_len), as OLMo's dataset returns them, to train on; False for
        those with max_count or more repeats."""
        return np.array([self.max_repeats(instance) < self.max_count for instance in np.asarray(instances)], dtype=bool)

    def keep(self, rows: np.ndarray) -> np.ndarray:
        """Boolean (n,) for the trainer's rows (n, seq_len + 1): `keep_instances` of the inputs row[:-1], the instance
        OLMo filters; the extra label token at the end never decides."""
        return self.keep_instances(np.asarray(rows)[:, :-1])


def _longest_true_run(mask: np.ndarray) -> int:
    """Length of the longest stretch of consecutive True values."""
    if not mask.any():
        return 0
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return int((ends - starts).max())
