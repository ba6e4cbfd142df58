"""Step s+1's batch prepared on the host while step s runs.

A daemon thread draws the next batch from the loader (`TrainBatches.next_batch`: the memmap read), applies the instance
filter (OLMo's repetition filter), finds each micro-batch's documents and, for a CUDA run, puts the tensors in pinned
memory, so that the step's copies to the device are asynchronous (`non_blocking=True`). One thread draws the batches
one after the other, exactly as the loop would: the data order is the loader's.

A checkpoint must record the loader's position after the batches that completed steps consumed, not after those
prepared ahead of them. So each prepared batch travels with the loader's `state_dict()` taken right after it was drawn,
and `Prefetcher.state_dict()` answers with the state of the last batch handed out; `close()` rewinds the loader to it.
A resumed run therefore draws exactly the batches an uninterrupted one would.

An exception on the thread (a damaged shard, say) is raised again by the consumer's next `next()`; `close()` (at the
end of `Trainer.fit`, and when a step raises) stops the thread and waits for it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from fope_lm.data.dataset import NO_TARGET
from fope_lm.data.instance_filter import RepetitionFilter
from fope_lm.nn.documents import Documents


@dataclass(frozen=True)
class HostBatch:
    """One step's rows on the host, ready to copy to the device."""

    inputs: torch.Tensor  # (n, T) int64: row[:-1], contiguous
    labels: torch.Tensor  # (n, T) int64: row[1:], NO_TARGET throughout the rows the instance filter drops
    filtered: int  # rows the instance filter dropped
    documents: tuple[Documents, ...] | None  # each micro-batch's documents; None when training ignores them

    def micro_batches(self, size: int) -> list[tuple[torch.Tensor, Documents | None]]:
        """(inputs, documents) of each micro-batch of `size` rows (views, pinned where the batch is)."""
        inputs = self.inputs.split(size)
        return list(zip(inputs, self.documents or (None,) * len(inputs), strict=True))


def prepare_batch(
    rows: torch.Tensor,
    *,
    micro_batch_size: int,
    instance_filter: RepetitionFilter | None = None,
    eos_id: int | None = None,
    pin: bool = False,
) -> HostBatch:
    """A step's rows (n, T + 1) -> its `HostBatch`: the filter's masks in the labels (OLMo's: a filtered row stays in the
    batch, out of the loss), the documents of each micro-batch when `eos_id` is given, pinned memory when `pin`."""
    inputs, labels = rows[:, :-1].contiguous(), rows[:, 1:].clone()
    filtered = 0
    if instance_filter is not None:
        dropped = torch.from_numpy(~instance_filter.keep(rows.numpy()))
        labels[dropped] = NO_TARGET
        filtered = int(dropped.sum())
    documents = None
    if eos_id is not None:  # found on the host, so that no forward reads the device
        documents = tuple(Documents.of_tokens(part, eos_id) for part in inputs.split(micro_batch_size))
    if pin:
        inputs, labels = inputs.pin_memory(), labels.pin_memory()
        if documents is not None:
            documents = tuple(Documents(d.ids.pin_memory(), None if d.cu_seqlens is None else d.cu_seqlens.pin_memory()) for d in documents)
    return HostBatch(inputs, labels, filtered, documents)


class Loader(Protocol):
    """What the prefetcher draws from (`fope_lm.data.TrainBatches`)."""

    def next_batch(self) -> torch.Tensor: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


Prepared = TypeVar("Prepared")


@dataclass(frozen=True)
class _Failure:
    error: BaseException


class Prefetcher(Generic[Prepared]):
    """`prepare(loader.next_batch())`, `depth` batches ahead of `next()` on a daemon thread started by the first
    `next()` (so that a resume's `load_state_dict` comes first). depth 0: nothing ahead, all on the caller's thread."""

    def __init__(self, loader: Loader, prepare: Callable[[torch.Tensor], Prepared], depth: int = 1):
        if depth < 0:
            raise ValueError(f"depth must be 0 or more, got {depth}")
        self.loader, self.prepare, self.depth = loader, prepare, depth
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._consumed: dict | None = None  # the loader's state after the last batch handed out, while it runs ahead
        self._error: BaseException | None = None

    def next(self) -> Prepared:
        if self.depth == 0:
            return self.prepare(self.loader.next_batch())
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, _Failure):
            self._error = item.error
            raise item.error
        prepared, self._consumed = item
        return prepared

    def state_dict(self) -> dict:
        """The loader's state after the batches handed out so far (what a checkpoint of the completed steps holds)."""
        return self.loader.state_dict() if self._consumed is None else dict(self._consumed)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.loader.load_state_dict(state)

    def close(self) -> None:
        """Stop the thread, drop what it prepared ahead, and rewind the loader to the batches handed out."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():  # a put blocked on the full queue returns once it is drained
            self._drain()
            self._thread.join(timeout=0.1)
        self._drain()
        self._thread = None
        if self._consumed is not None:
            self.loader.load_state_dict(self._consumed)
            self._consumed = None

    def __enter__(self) -> Prefetcher[Prepared]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        self._consumed = self.loader.state_dict()  # nothing handed out yet
        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        self._thread = threading.Thread(target=self._work, args=(self._queue, self._stop), name="fope-prefetch", daemon=True)
        self._thread.start()

    def _work(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                rows = self.loader.next_batch()
                state = self.loader.state_dict()  # right after this batch: what a checkpoint after its step holds
                out.put((self.prepare(rows), state))
        except BaseException as exc:  # raised again by the consumer's next next()
            out.put(_Failure(exc))

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
