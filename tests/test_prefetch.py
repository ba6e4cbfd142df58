"""The prefetching loader (fope_lm.training.prefetch): the batches, filter masks and documents of the loop without it,
in the same order; the data position of the steps done (what a checkpoint saves), not of the batch prepared ahead;
a failure on its thread raised in the loop; the thread stopped by close(). Fast: no subprocess, no training."""

import threading
from functools import partial

import pytest
import torch

from fope_lm.bench import prefetch_step
from fope_lm.data import TokenData, TrainBatches
from fope_lm.data.instance_filter import RepetitionFilter
from fope_lm.errors import DataError
from fope_lm.training.prefetch import HostBatch, Prefetcher, prepare_batch

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 12
PREPARE = partial(prepare_batch, micro_batch_size=4, instance_filter=RepetitionFilter(max_count=3))  # OLMo's is 32


@pytest.fixture(scope="module")
def data(embedded_data_root) -> TokenData:
    return TokenData(next(embedded_data_root.glob("embedded-py*")))


class WithRepeats:
    """TrainBatches whose rows starting with an even token repeat it 5 times: about half the rows are then filtered
    (the embedded corpus has no run of 3 copies in 48 tokens), so that both kinds are in every comparison."""

    def __init__(self, batches: TrainBatches):
        self.batches = batches

    def next_batch(self) -> torch.Tensor:
        rows = self.batches.next_batch()
        even = rows[:, 0] % 2 == 0
        rows[even, 1:5] = rows[even, :1]
        return rows

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def loader(data: TokenData) -> WithRepeats:
    return WithRepeats(TrainBatches(data, seq_len=48, global_batch_size=8, seed=3))


def prepare(data: TokenData):
    return partial(PREPARE, eos_id=data.eos_id)


def unprefetched(data: TokenData, steps: int) -> tuple[list[HostBatch], list[dict]]:
    """The loop without a prefetcher: each step's batch, and the loader's state after it."""
    batches, source = [], loader(data)
    states = []
    for _ in range(steps):
        batches.append(prepare(data)(source.next_batch()))
        states.append(source.state_dict())
    return batches, states


def assert_same(a: HostBatch, b: HostBatch) -> None:
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels) and a.filtered == b.filtered
    assert a.documents is not None and b.documents is not None and len(a.documents) == len(b.documents) == 2
    for x, y in zip(a.documents, b.documents, strict=True):
        assert torch.equal(x.ids, y.ids) and x.cu_seqlens is not None and y.cu_seqlens is not None
        assert torch.equal(x.cu_seqlens, y.cu_seqlens)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_batches_and_states_are_the_loops(data, depth):
    expected, states = unprefetched(data, STEPS)
    assert 0 < sum(b.filtered for b in expected) < 8 * STEPS  # filtered rows and kept rows
    assert all(b.labels[~(b.labels == -100).all(1)].ne(-100).all() for b in expected)  # a kept row keeps every target
    with Prefetcher(loader(data), prepare(data), depth=depth) as prefetcher:
        assert prefetcher.state_dict()["samples_consumed"] == 0
        for step in range(STEPS):
            assert_same(prefetcher.next(), expected[step])
            assert prefetcher.state_dict() == states[step]  # the steps done, however far the thread has read


def test_close_rewinds_to_the_batches_handed_out_and_a_resume_continues(data):
    expected, states = unprefetched(data, STEPS)
    source = loader(data)
    prefetcher = Prefetcher(source, prepare(data), depth=2)
    for step in range(5):
        assert_same(prefetcher.next(), expected[step])
    saved = prefetcher.state_dict()  # a checkpoint after step 5, while batches 6 and 7 wait in the queue
    prefetcher.close()
    assert saved == states[4] and source.state_dict() == states[4] and prefetcher.state_dict() == states[4]
    assert_same(prefetcher.next(), expected[5])  # started again where the steps stopped
    prefetcher.close()

    resumed = Prefetcher(loader(data), prepare(data))  # a new run resuming from the saved position
    resumed.load_state_dict(saved)
    with resumed:
        for step in range(5, STEPS):
            assert_same(resumed.next(), expected[step])
            assert resumed.state_dict() == states[step]


class FailingLoader:
    """A loader whose `fail_at`-th batch read raises, as a damaged shard does."""

    def __init__(self, fail_at: int):
        self.fail_at, self.position = fail_at, 0

    def next_batch(self) -> torch.Tensor:
        if self.position + 1 == self.fail_at:
            raise DataError("shard 0 does not match its sha256")
        self.position += 1
        return torch.full((2, 5), self.position)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def test_a_failure_on_the_thread_is_raised_by_next():
    prefetcher = Prefetcher(FailingLoader(fail_at=3), lambda rows: int(rows[0, 0]))
    assert [prefetcher.next(), prefetcher.next()] == [1, 2]
    for _ in range(2):  # and again, should the caller go on
        with pytest.raises(DataError, match="sha256"):
            prefetcher.next()
    assert prefetcher.state_dict() == {"position": 2}
    prefetcher.close()
    assert prefetcher.loader.state_dict() == {"position": 2}


def test_a_failure_in_prepare_is_raised_too():
    def prepare_rows(rows):
        raise ValueError("bad rows")

    with Prefetcher(FailingLoader(fail_at=0), prepare_rows) as prefetcher, pytest.raises(ValueError, match="bad rows"):
        prefetcher.next()


def test_close_stops_a_thread_blocked_on_the_full_queue(data):
    prefetcher = Prefetcher(loader(data), prepare(data), depth=1)
    prefetcher.next()
    thread = prefetcher._thread
    assert thread is not None and thread.daemon and thread.is_alive()  # it prepared the next batch and waits to hand it
    prefetcher.close()
    assert not thread.is_alive() and thread not in threading.enumerate()  # (other tests may leave threads of their own)
    assert prefetcher.state_dict()["samples_consumed"] == 8


def test_the_trainer_keeps_the_position_of_its_steps_and_fit_stops_the_thread_on_errors(isolated_trainer, monkeypatch):
    trainer = isolated_trainer("train.instance_filter=true", "train.document_mask=true")
    for step in (1, 2):
        trainer.train_step(step)
    assert trainer.batches.state_dict()["samples_consumed"] == 2 * 8  # what save() records: not the batch read ahead
    train_step = trainer.train_step

    def third_step_then_a_failure(step):
        if step == 4:
            raise RuntimeError("the step failed")
        return train_step(step)

    monkeypatch.setattr(trainer, "train_step", third_step_then_a_failure)
    trainer.step = 2
    thread = trainer.batches._thread
    with pytest.raises(RuntimeError, match="the step failed"):
        trainer.fit()
    assert trainer.batches._thread is None and thread is not None and not thread.is_alive()
    assert trainer.batches.loader.state_dict()["samples_consumed"] == 3 * 8  # rewound to the steps done


def test_prefetch_bench_runs_both_ways_on_the_same_batches(data):
    """The benchmark at toy sizes (tests/test_bench.py's rule: every script runs, so that it cannot rot); it checks
    itself that both contenders drew the same number of batches. Nothing here asserts on speed."""
    results = prefetch_step.main(
        ["--data-dir", str(data.dir), "--batch", "4", "--micro-batch", "2", "--seq-len", "32", "--block", "1", "--warmup", "0",
         "--repeats", "1", "--prepare-shapes", "4x32", "--prepare-repeats", "2"]
    )  # fmt: skip
    assert set(results["prepare_ms"]["4x32"]) == {"read", "filter", "documents", "total"}
    assert set(results["step"]["seconds_per_step"]) == {"inline", "prefetched"} and results["step"]["ratio"] > 0
