"""Eval at long lengths: peak memory and time per token for T = 1k ... 16k, per position encoding, in one run.

Each forward is an eval forward: batch 1, no_grad, the loss over all T targets with the LM head applied
`--loss-chunk` positions at a time (the model's `loss_chunk_size`). Memory is then linear in T: no (T, T) attention
scores (SDPA's fused kernels; ALiBi's and KERPLE's bias is built one query chunk of at most 64 MiB at a time) and
no (T, V) float32 logits.
The "MiB/1k" column (peak / T) stays flat where that holds; a T x T term would double it at every doubling of T
(one float32 (T, T) matrix per head is 1 GiB at 16k). Time per token grows with T: attention is O(T^2) compute.
After one warm-up forward per encoding at the longest length, the lengths run shortest first, the encodings
round-robin at each length; "time ratio" is against the first of --pes.

Memory, above what was in use just before the forward: CUDA, torch.cuda.max_memory_allocated; CPU, the peak of the
tensor storage alive, counted op by op under a TorchDispatchMode (every storage an aten op returns, until it is
freed). That is exact and the same on every machine, where the resident set moves with the allocator, huge pages
and the kernel; it leaves out scratch that a kernel frees before it returns (SDPA's blocked CPU kernel works in tiles).

    python scripts/bench/eval_memory.py                                   # CPU: tiny, T = 1k..16k
    python scripts/bench/eval_memory.py --preset 60m --device cuda --dtype bf16 --max-len 65536
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fope_lm.bench.common import autocast, print_table, synchronize
from fope_lm.devices import resolve_device
from fope_lm.nn.model import build_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--pes", default="rope,nope,alibi,fope", help="comma-separated; the first is the time baseline")
    parser.add_argument("--min-len", type=int, default=1024)
    parser.add_argument("--max-len", type=int, default=16384, help="lengths double from --min-len up to this")
    parser.add_argument("--train-len", type=int, default=512, help="the models' max_seq_len (FoPE's floor frequency)")
    parser.add_argument("--loss-chunk", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per (pe, length), after a warm-up at the longest")
    parser.add_argument("--json", help="also write the rows here")
    return parser.parse_args(argv)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive, after every aten op; `peak` is the maximum."""

    def __init__(self):
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ref in [ref for ref in self.live if ref.expired()]:
            self.current -= self.live.pop(ref)
        # a view or an in-place op returns an input's storage: nothing new, and perhaps a weight's
        inputs = {StorageWeakRef(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref not in inputs and ref not in self.live:
                    self.live[ref] = t.untyped_storage().nbytes()
                    self.current += self.live[ref]
        self.peak = max(self.peak, self.current)
        return out


class PeakMemory:
    """Bytes in use at the peak of a `with` block above those in use when it began, on `device`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.tensors = LiveTensorBytes().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.tensors.__exit__(*exc)
            self.peak = self.tensors.peak


@torch.no_grad()
def eval_forward(model, ids: torch.Tensor, *, loss_chunk: int, device: torch.device, dtype: str) -> tuple[float, int]:
    """(seconds, peak bytes) of one eval forward: the summed loss of ids[:, 1:] given ids[:, :-1]."""
    memory = PeakMemory(device)
    with memory:
        synchronize(device)
        start = time.perf_counter()
        with autocast(device, dtype):
            loss = model(ids[:, :-1], ids[:, 1:], loss_chunk_size=loss_chunk, reduction="sum").loss
        loss.item()
        seconds = time.perf_counter() - start
    return seconds, memory.peak


def build_eval_model(preset: str, pe: str, *, vocab: int, train_len: int, device: torch.device):
    with device:  # initialised where it runs
        return build_model(preset, pe=pe, vocab_size=vocab, max_seq_len=train_len).eval()


def warmed_up_models(preset: str, pes: list[str], *, vocab: int, train_len: int, max_len: int, **forward_kwargs):
    """({pe: model}, random ids of max_len + 1 tokens) after one forward per model at max_len: rotary tables are
    built (and cached, sliced for any shorter length) before anything is measured."""
    device = forward_kwargs["device"]
    models = {pe: build_eval_model(preset, pe, vocab=vocab, train_len=train_len, device=device) for pe in pes}
    ids = torch.randint(0, vocab, (1, max_len + 1), device=device)
    eval_round(models, ids, max_len, **forward_kwargs)
    return models, ids


def eval_round(models: dict, ids: torch.Tensor, length: int, **forward_kwargs) -> dict[str, tuple[float, int]]:
    """One eval forward per model at `length`, round-robin: {pe: (seconds, peak bytes)}."""
    return {pe: eval_forward(model, ids[:, : length + 1], **forward_kwargs) for pe, model in models.items()}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = args.dtype
    torch.manual_seed(0)
    lengths: list[int] = []
    while (length := args.min_len * 2 ** len(lengths)) <= args.max_len:
        lengths.append(length)
    pes = args.pes.split(",")
    forward_kwargs = {"loss_chunk": args.loss_chunk, "device": device, "dtype": dtype}
    models, ids = warmed_up_models(args.preset, pes, vocab=args.vocab, train_len=args.train_len, max_len=lengths[-1], **forward_kwargs)
    rows = []
    for length in lengths:
        seconds: dict[str, list[float]] = {pe: [] for pe in pes}
        peaks = {pe: 0 for pe in pes}
        for _ in range(args.repeats):
            for pe, (t, peak) in eval_round(models, ids, length, **forward_kwargs).items():
                seconds[pe].append(t)
                peaks[pe] = max(peaks[pe], peak)
        baseline = statistics.median(seconds[pes[0]])
        for pe in pes:
            t = statistics.median(seconds[pe])
            rows.append({"pe": pe, "seq_len": length, "peak_mib": peaks[pe] / 2**20, "seconds": t, "time_ratio": t / baseline})

    n_params = sum(p.numel() for p in next(iter(models.values())).parameters()) / 1e6
    print(
        f"# eval memory: {args.preset} ({n_params:.1f}M params), batch 1, no_grad, loss_chunk_size {args.loss_chunk}, "
        f"vocab {args.vocab}, {dtype}, {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}; peak = memory above that in use before the forward"
    )
    table = [
        [
            r["pe"],
            r["seq_len"],
            f"{r['peak_mib']:.1f}",
            f"{r['peak_mib'] / (r['seq_len'] / 1024):.2f}",
            f"{r['seconds'] / r['seq_len'] * 1e6:.1f}",
            f"{r['time_ratio']:.3f}",
        ]
        for r in sorted(rows, key=lambda r: (pes.index(r["pe"]), r["seq_len"]))
    ]
    print_table(["pe", "T", "peak MiB", "MiB/1k", "us/token", "time ratio"], table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "dtype": dtype, "device": str(device), "rows": rows}, f, indent=2)
    return rows
