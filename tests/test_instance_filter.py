"""OLMo's repetition instance filter (fope_lm.data.instance_filter) against two direct implementations on a crafted
corpus: a brute-force count of consecutive copies, and OLMo's own detection code copied here; and the instance it
filters: the seq_len tokens the model reads, never the extra label token of the trainer's rows."""

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


# OLMo's detection, copied densely from allenai/OLMo @ 59a53e3 (unchanged since 4e00460, July 2024)
# olmo/data/util.py: find_end_first_consecutive_true, find_start_last_consecutive_true, group_consecutive_values,
# find_periodic_sequences (lines 7-119); OLMo-core's src/olmo_core/data/utils.py holds the same code.
def find_end_first_consecutive_true(arr):
    if not arr[0]:
        return 0
    prog = np.cumsum(arr)
    if prog[-1] == len(arr):
        return len(arr)
    return np.where(prog[:-1:] == prog[1::])[0][0] + 1


def find_start_last_consecutive_true(arr):
    reverse = find_end_first_consecutive_true(arr[::-1])
    return len(arr) - reverse if reverse > 0 else -1


def find_periodic_sequences(arr, max_period, min_period=1, mask_value=-1):
    """Yields (start, end, period, times) of each periodic run; only runs of times > 2 (OLMo's line 116)."""
    assert not (arr == mask_value).any()
    max_period = min(max_period, len(arr) // 3)
    for period in range(min_period, max_period + 1):
        padded_arr = np.pad(arr, (0, period - (len(arr) % period)), constant_values=mask_value)
        shaped_arr = padded_arr.reshape(-1, period)
        is_equal_to_prev_row = shaped_arr == np.roll(shaped_arr, shift=1, axis=0)
        rows_with_period, *_ = np.where(is_equal_to_prev_row.all(axis=1))
        if len(rows_with_period) == 0:
            continue
        for sequence in np.split(rows_with_period, np.where(np.diff(rows_with_period) != 1)[0] + 1):
            start_row, end_row = sequence[0], sequence[-1]
            start_offset = find_start_last_consecutive_true(is_equal_to_prev_row[start_row - 1])
            start_offset = period - start_offset if start_offset > 0 else 0
            end_offset = find_end_first_consecutive_true(is_equal_to_prev_row[end_row + 1])
            start_pos = (start_row - 1) * period - start_offset
            end_pos = ((end_row + 1) * period) + end_offset
            times = (end_pos - start_pos) // period
            if times > 2:
                yield start_pos, end_pos, period, times


def olmo_validate_instance(input_ids, max_period, min_period, max_count) -> bool:
    """allenai/OLMo olmo/data/memmap_dataset.py `MemMapDataset._validate_instance` (lines 236-247; OLMo-core's
    `NumpyDatasetBase._validate_instance` is the same): False when some run has max_count or more copies.
    `input_ids` is the dataset's instance: seq_len tokens, as int64 (OLMo's torch.long)."""
    runs = find_periodic_sequences(np.asarray(input_ids, dtype=np.int64), max_period=max_period, min_period=min_period)
    return not any(times >= max_count for *_, times in runs)


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


def test_flags_exactly_what_olmo_and_a_brute_force_count_flag():
    instances = crafted_rows()
    olmo = RepetitionFilter()  # OLMo's values: periods 1 .. 13, 32 copies
    assert (olmo.max_period, olmo.min_period, olmo.max_count) == (13, 1, 32)
    keep = olmo.keep_instances(instances)
    for instance, kept in zip(instances, keep, strict=True):
        repeats = brute_force_repeats(instance, 1, 13)
        assert olmo.max_repeats(instance) == repeats
        assert kept == (repeats < 32) == olmo_validate_instance(instance, 13, 1, 32)
    assert 10 < (~keep).sum() < len(instances) - 10  # the crafted corpus has instances on both sides of the threshold


@pytest.mark.parametrize("options", [(4, 2, 6), (13, 5, 10), (3, 1, 3)])
def test_other_periods_and_counts(options):
    max_period, min_period, max_count = options
    rule = RepetitionFilter(max_period, min_period, max_count)
    instances = crafted_rows(seed=1, n_rows=40, length=257)
    for instance, kept in zip(instances, rule.keep_instances(instances), strict=True):
        assert kept == (brute_force_repeats(instance, min_period, max_period) < max_count)
        assert kept == olmo_validate_instance(instance, max_period, min_period, max_count)


def test_trainer_rows_are_filtered_by_their_instance_not_the_label_token():
    """The trainer's rows are seq_len + 1 tokens (inputs row[:-1] and one more label token); OLMo filters its
    seq_len-token instance, so `keep(rows)` is OLMo's verdict on row[:-1]."""
    seq_len, rng = 512, np.random.default_rng(2)
    rows = np.concatenate([crafted_rows(seed=3, n_rows=30, length=seq_len + 1), rng.integers(10, 5000, (3, seq_len + 1))])
    rows[-3, seq_len - 31 :] = 7  # 32 copies only with the 513th token: 31 in the instance
    rows[-2, seq_len - 32 : seq_len] = 7  # 32 copies ending at the 512th token: in the instance
    rows[-1, seq_len - 32 :] = 7  # 33 with the label token, 32 without
    rule = RepetitionFilter()
    keep = rule.keep(rows)
    assert keep.tolist() == [olmo_validate_instance(row[:seq_len], 13, 1, 32) for row in rows]
    assert keep.tolist() == rule.keep_instances(rows[:, :seq_len]).tolist()
    assert keep[-3] and not olmo_validate_instance(rows[-3], 13, 1, 32)  # the 513-token window would be filtered
    assert not keep[-2] and not keep[-1]
    assert 5 < (~keep).sum() < len(rows) - 5


def test_edge_instances_and_bad_settings(plan_with):
    rule = RepetitionFilter()
    assert not rule.keep_instances(np.full((1, 32), 7))[0]  # 32 copies of one token: flagged
    assert rule.keep_instances(np.full((1, 31), 7))[0]
    assert rule.keep(np.full((1, 32), 7))[0]  # a trainer row: 31 input tokens
    assert rule.keep_instances(np.arange(2 * 64).reshape(2, 64)).all()
    # OLMo reports runs of 3 or more copies only, so its max_count 2 flags what 3 flags: refused, not silently 3
    instances = np.concatenate([np.random.default_rng(4).permutation(64)[None] + 10, crafted_rows(seed=4, n_rows=20, length=64)])
    instances[0, 10:14] = [5, 6, 5, 6]  # two copies of (5, 6) in distinct tokens: a direct count with max_count 2 flags it
    assert brute_force_repeats(instances[0], 1, 13) == 2 and olmo_validate_instance(instances[0], 13, 1, 2)
    assert [olmo_validate_instance(x, 13, 1, 2) for x in instances] == [olmo_validate_instance(x, 13, 1, 3) for x in instances]
    with pytest.raises(ValueError, match=r"repetition_max_count must be at least 3 .*got 2: set repetition_max_count=3"):
        RepetitionFilter(max_count=2)
    with pytest.raises(ConfigError, match=r"^train.repetition_max_count must be at least 3 .*got 2: set repetition_max_count=3"):
        plan_with("train.repetition_max_count=2")
    with pytest.raises(ConfigError, match="train.repetition periods must satisfy 1 <= min_period <= max_period"):
        plan_with("train.repetition_min_period=14")
