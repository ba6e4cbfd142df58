"""OLMo's repetition instance filter (fope_lm.data.instance_filter) against two direct implementations on a crafted
corpus: a brute-force count of consecutive copies, and OLMo's own row-reshaping algorithm re-derived here."""

import numpy as np
import pytest

from fope_lm.data.instance_filter import RepetitionFilter
from fope_lm.errors import ConfigError


def brute_force_repeats(tokens: np.ndarray, min_period: int, max_period: int) -> int:
    """max over periods p and starts s of the number of consecutive copies of tokens[s : s + p] starting at s."""
    best, tokens, n = 1, list(tokens), len(tokens)
    for p in range(min_period, max_period + 1):
        for s in range(n - p + 1):
            copies = 1
            while s + (copies + 1) * p <= n and tokens[s + copies * p : s + (copies + 1) * p] == tokens[s : s + p]:
                copies += 1
            best = max(best, copies)
    return best


def olmo_flags(tokens: np.ndarray, max_period: int, min_period: int, max_count: int) -> bool:
    """OLMo's `find_periodic_sequences` + `_validate_instance`: the array reshaped into rows of `period`, runs of rows
    equal to the previous one, extended by the partial rows around them; flagged when some run spans max_count copies."""

    def end_of_first_true_run(row):
        return 0 if not row[0] else (len(row) if row.all() else int(np.argmin(row)))

    def start_of_last_true_run(row):
        reverse = end_of_first_true_run(row[::-1])
        return len(row) - reverse if reverse > 0 else -1

    for period in range(min_period, min(max_period, len(tokens) // 3) + 1):
        padded = np.pad(tokens.astype(np.int64), (0, period - len(tokens) % period), constant_values=-1)
        rows = padded.reshape(-1, period)
        equal = rows == np.roll(rows, 1, axis=0)
        full = np.flatnonzero(equal.all(axis=1))
        for group in np.split(full, np.flatnonzero(np.diff(full) != 1) + 1) if full.size else []:
            first, last = group[0], group[-1]
            start_offset = start_of_last_true_run(equal[first - 1])
            start_offset = period - start_offset if start_offset > 0 else 0
            end_offset = end_of_first_true_run(equal[last + 1]) if last + 1 < len(equal) else 0
            start, end = (first - 1) * period - start_offset, (last + 1) * period + end_offset
            times = (end - start) // period
            if times > 2 and times >= max_count:
                return True
    return False


def crafted_rows(seed: int = 0, n_rows: int = 80, length: int = 449) -> np.ndarray:
    """Rows of random tokens, most with one periodic stretch planted at a random offset: periods 1 .. 15, 20 .. 40
    copies (some below the 32-copy threshold, some above; periods past 13 are out of the filter's range)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(10, 5000, size=(n_rows, length))
    for row in rows[: n_rows * 3 // 4]:
        period, copies = int(rng.integers(1, 16)), int(rng.integers(20, 41))
        span = min(period * copies + int(rng.integers(0, period)), length - 2)  # sometimes a partial copy at the end
        start = int(rng.integers(1, length - span))
        unit = rng.integers(10, 5000, size=period)
        row[start : start + span] = np.resize(unit, span)
    return rows


def test_flags_exactly_what_direct_implementations_flag():
    rows = crafted_rows()
    olmo = RepetitionFilter()  # OLMo's values: periods 1 .. 13, 32 copies
    assert (olmo.max_period, olmo.min_period, olmo.max_count) == (13, 1, 32)
    keep = olmo.keep(rows)
    for row, kept in zip(rows, keep, strict=True):
        repeats = brute_force_repeats(row, 1, 13)
        assert olmo.max_repeats(row) == repeats
        assert kept == (repeats < 32) == (not olmo_flags(row, 13, 1, 32))
    assert 10 < (~keep).sum() < len(rows) - 10  # the crafted corpus has rows on both sides of the threshold


@pytest.mark.parametrize("options", [(4, 2, 6), (13, 5, 10)])
def test_other_periods_and_counts(options):
    max_period, min_period, max_count = options
    rule = RepetitionFilter(max_period, min_period, max_count)
    rows = crafted_rows(seed=1, n_rows=40, length=257)
    for row, kept in zip(rows, rule.keep(rows), strict=True):
        assert kept == (brute_force_repeats(row, min_period, max_period) < max_count)


def test_edge_rows_and_bad_settings(plan_with):
    rule = RepetitionFilter()
    assert not rule.keep(np.full((1, 32), 7))[0]  # 32 copies of one token: flagged
    assert rule.keep(np.full((1, 31), 7))[0]
    assert rule.keep(np.arange(2 * 64).reshape(2, 64)).all()
    with pytest.raises(ConfigError, match="train.repetition periods must satisfy 1 <= min_period <= max_period"):
        plan_with("train.repetition_min_period=14")
