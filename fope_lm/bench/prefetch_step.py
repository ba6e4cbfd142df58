"""The train step with its next batch prepared on a background thread (fope_lm.training.prefetch, what the trainer does)
against the same step preparing its batch itself, interleaved in one run; and what that preparation costs on the host.

prepare   host milliseconds per step of each part of preparing a batch of --prepare-shapes (rows per rank x T): the
          memmap read (TrainBatches.next_batch), OLMo's repetition filter (periods 1..13, 32 copies) and the documents
          of each micro-batch of 8 rows (Documents.of_tokens); the trainer's prefetcher does all three off the step
step      the trainer's step on --preset: each micro-batch's forward + backward with its documents (attention within
          documents) and the filter's masks, then AdamW; "inline" draws the batch at the start of the step (Prefetcher
          depth 0: no thread), "prefetched" from the thread, which prepared it while the previous step ran. Timed in
          blocks of --block steps round-robin (fope_lm.bench.common.time_interleaved), which of the two goes first
          alternating from round to round, so that machine noise and order hit both alike and the thread gets no head
          start beyond its own block's first step

On CPU a step of even the tiny model takes far longer than preparing its batch, so the ratio shows what the thread
costs there (it shares the cores); on a GPU, where a step is milliseconds, the prepare table is what it saves.

    python scripts/bench/prefetch_step.py                  # tiny, 16 x 512 tokens in micro-batches of 8, embedded corpus
    python scripts/bench/prefetch_step.py --device cuda --dtype bf16 --preset 60m --batch 32 --seq-len 1024
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fope_lm.bench.common import autocast, print_table, synchronize, time_interleaved
from fope_lm.data import TokenData, TrainBatches, ensure_prepared
from fope_lm.data.instance_filter import RepetitionFilter
from fope_lm.devices import resolve_device
from fope_lm.nn.documents import Documents
from fope_lm.nn.model import build_model
from fope_lm.paths import CONFIG_DIR
from fope_lm.training.prefetch import HostBatch, Prefetcher, prepare_batch

MICRO_FOR_DOCUMENTS = 8  # the prepare table's micro-batch rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="a prepared dataset dir (default: the embedded corpus, prepared under --data-root)")
    parser.add_argument("--data-root", help="where the embedded corpus is prepared (default: configs/data/embedded.yaml's root)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=16, help="rows per step")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--instance-filter", action=argparse.BooleanOptionalAction, default=True, help="OLMo's repetition filter")
    parser.add_argument("--block", type=int, default=4, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=1, help="blocks per contender before timing")
    parser.add_argument("--repeats", type=int, default=8, help="timed blocks per contender")
    parser.add_argument("--prepare-shapes", default="16x512,16x1024,64x1024", help="rows x T; empty: no prepare table")
    parser.add_argument("--prepare-repeats", type=int, default=20)
    parser.add_argument("--only", default="prepare,step", help="comma-separated sections")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def token_data(args) -> TokenData:
    if args.data_dir:
        return TokenData(args.data_dir)
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / "embedded.yaml"), resolve=True)
    assert isinstance(cfg, dict)
    return TokenData(ensure_prepared({**cfg, **({"root": args.data_root} if args.data_root else {})}))


def prepare_costs(data: TokenData, rows: int, seq_len: int, repeats: int) -> dict[str, float]:
    """Median host milliseconds of each part of preparing one batch of `rows` x `seq_len`."""
    batches, repetition = TrainBatches(data, seq_len, rows, seed=0), RepetitionFilter()
    parts: dict[str, list[float]] = {"read": [], "filter": [], "documents": []}
    for _ in range(repeats):
        start = time.perf_counter()
        batch = batches.next_batch()
        read = time.perf_counter()
        repetition.keep(batch.numpy())
        filtered = time.perf_counter()
        for part in batch[:, :-1].contiguous().split(MICRO_FOR_DOCUMENTS):
            Documents.of_tokens(part, data.eos_id)
        done = time.perf_counter()
        for name, seconds in (("read", read - start), ("filter", filtered - read), ("documents", done - filtered)):
            parts[name].append(seconds * 1e3)
    medians = {name: statistics.median(values) for name, values in parts.items()}
    return medians | {"total": sum(medians.values())}


def train_step(model, optimizer, batch: HostBatch, *, micro: int, device, dtype: str) -> None:
    """What Trainer.train_step does with a prepared batch, without accelerate: token-weighted loss, AdamW."""
    labels = batch.labels.to(device, non_blocking=True)
    targets = (labels != -100).sum().clamp_min(1)
    for (inputs, documents), micro_labels in zip(batch.micro_batches(micro), labels.split(micro), strict=True):
        doc_ids = None if documents is None else documents.to(device)
        with autocast(device, dtype):
            loss = model(inputs.to(device, non_blocking=True), micro_labels, reduction="sum", doc_ids=doc_ids).loss
        (loss / targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_times(data: TokenData, args, device) -> dict:
    """Median seconds per step, inline and prefetched, each drawing the same batches from its own loader."""
    torch.manual_seed(0)
    with device:
        model = build_model(args.preset, pe="rope", vocab_size=data.vocab_size, max_seq_len=args.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    prepare = partial(
        prepare_batch,
        micro_batch_size=args.micro_batch,
        instance_filter=RepetitionFilter() if args.instance_filter else None,
        eos_id=data.eos_id,
        pin=device.type == "cuda",
    )
    loaders = {
        name: Prefetcher(TrainBatches(data, args.seq_len, args.batch, seed=0), prepare, depth=depth)
        for name, depth in (("inline", 0), ("prefetched", 1))
    }

    def block(prefetcher: Prefetcher) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.block):
            train_step(model, optimizer, prefetcher.next(), micro=args.micro_batch, device=device, dtype=args.dtype)
        synchronize(device)
        return (time.perf_counter() - start) / args.block

    try:
        blocks = {name: partial(block, loader) for name, loader in loaders.items()}
        samples: dict[str, list[float]] = {name: [] for name in blocks}
        for round_ in range(args.warmup + args.repeats):  # one block each, round-robin; the order alternates each round
            order = list(blocks) if round_ % 2 == 0 else list(blocks)[::-1]
            for name, seconds in time_interleaved({name: blocks[name] for name in order}, 0, 1).items():
                samples[name] += [seconds] if round_ >= args.warmup else []
        medians = {name: statistics.median(values) for name, values in samples.items()}
        consumed = {name: loader.state_dict()["samples_consumed"] for name, loader in loaders.items()}
    finally:
        for loader in loaders.values():
            loader.close()
    assert consumed["inline"] == consumed["prefetched"], consumed  # the same batches, in the same order
    return {
        "preset": args.preset, "batch": args.batch, "micro_batch": args.micro_batch, "seq_len": args.seq_len, "dtype": args.dtype,
        "instance_filter": args.instance_filter, "device": str(device), "block": args.block, "repeats": args.repeats,
        "seconds_per_step": medians, "ratio": medians["prefetched"] / medians["inline"],
    }  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, sections = resolve_device(args.device), set(args.only.split(","))
    data = token_data(args)
    results: dict = {
        "env": {"torch": torch.__version__, "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "data": str(Path(data.dir)),
    }
    print(
        f"# prefetch: {data.dir.name} (vocab {data.vocab_size}), {device} ({results['env']['machine']}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    if "prepare" in sections and args.prepare_shapes:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.prepare_shapes.split(",")]
        results["prepare_ms"] = {f"{rows}x{length}": prepare_costs(data, rows, length, args.prepare_repeats) for rows, length in shapes}
        parts = ("read", "filter", "documents", "total")
        print_table(
            ["rows x T", *(f"{part} ms" for part in parts)],
            [[shape, *(f"{ms[part]:.2f}" for part in parts)] for shape, ms in results["prepare_ms"].items()],
        )
    if "step" in sections:
        step = results["step"] = step_times(data, args, device)
        seconds = step["seconds_per_step"]
        print_table(
            ["preset", "rows x T (micro)", "filter", "inline ms/step", "prefetched ms/step", "prefetched / inline"],
            [[args.preset, f"{args.batch}x{args.seq_len} ({args.micro_batch})", "on" if args.instance_filter else "off",
              f"{seconds['inline'] * 1e3:.1f}", f"{seconds['prefetched'] * 1e3:.1f}", f"{step['ratio']:.3f}"]],
        )  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results
