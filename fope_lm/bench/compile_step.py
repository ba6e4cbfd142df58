"""The compiled train step, side by side with eager in one run, and what activation checkpointing saves:

graphs       graphs / breaks of the tiny model's training forward, per registered PE (torch._dynamo.explain)
speed        train-step time of `preset`, eager vs torch.compile (inductor), for each PE (default rope, fope),
             interleaved round-robin: compiled/eager per PE and compiled FoPE/RoPE
memory       peak tensor memory of one train step (forward + backward) of `preset` with activation checkpointing
             none / every_2 / full (CPU: counted op by op, LiveTensorBytes; CUDA: the allocator's peak)

  python scripts/bench/compile_step.py                 # CPU: 20m, 2 x 256 tokens; memory at T = 512
  python scripts/bench/compile_step.py --device cuda --dtype bf16 --batch 16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from fope_lm.bench.common import make_train_step, print_table, time_interleaved
from fope_lm.bench.eval_memory import PeakMemory
from fope_lm.bench.graphs import graph_breaks
from fope_lm.devices import resolve_device
from fope_lm.nn.model import build_model
from fope_lm.position import available


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="20m")
    parser.add_argument("--pes", default="rope,fope", help="comma-separated; the first is the baseline")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--memory-seq-len", type=int, default=512, help="the activation-checkpointing step's length")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--only", default="graphs,speed,memory", help="comma-separated sections")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def graph_counts(pes: list[str] | None = None) -> dict[str, dict]:
    """Graphs and breaks of the tiny model's training forward (full loss), per PE."""
    counts = {}
    for pe in pes or available():
        model = build_model("tiny", pe=pe, vocab_size=256, max_seq_len=32)
        ids = torch.randint(0, 256, (2, 33))
        counts[pe] = graph_breaks(model, ids[:, :-1], ids[:, 1:])
    return counts


def compiled_vs_eager(
    preset: str, pes: list[str], *, batch: int, seq_len: int, vocab: int, device, dtype: str, warmup: int, repeats: int
) -> dict:
    """Median seconds per train step, eager and compiled, per PE; the first compiled step (the compile) apart."""
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    steps, compile_seconds = {}, {}
    for pe in pes:
        for compiled in (False, True):
            torch.manual_seed(0)
            with device:
                model = build_model(preset, pe=pe, vocab_size=vocab, max_seq_len=seq_len)
            if compiled:
                model.compile()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            name = f"{pe}/{'compiled' if compiled else 'eager'}"
            steps[name] = make_train_step(model, lambda m: m(ids[:, :-1], ids[:, 1:]).loss, optimizer, device, dtype)
            if compiled:
                started = time.perf_counter()
                steps[name]()
                compile_seconds[pe] = time.perf_counter() - started
    medians = time_interleaved(steps, warmup, repeats)
    base = pes[0]
    return {
        "preset": preset, "batch": batch, "seq_len": seq_len, "dtype": dtype, "device": str(device),
        "seconds_per_step": medians,
        "first_compiled_step_s": compile_seconds,
        "compiled_over_eager": {pe: medians[f"{pe}/compiled"] / medians[f"{pe}/eager"] for pe in pes},
        f"compiled_over_{base}_compiled": {pe: medians[f"{pe}/compiled"] / medians[f"{base}/compiled"] for pe in pes},
    }  # fmt: skip


def activation_memory(preset: str, *, seq_len: int, batch: int, vocab: int, device, dtype: str, pe: str = "rope") -> dict:
    """Peak tensor bytes of one forward + backward per activation-checkpointing setting, and the ratios to none."""
    peaks = {}
    for mode, every in (("none", 0), ("every_2", 2), ("full", 1)):
        torch.manual_seed(0)
        with device:
            model = build_model(preset, pe=pe, vocab_size=vocab, max_seq_len=seq_len)
        model.set_activation_checkpointing(every)
        ids = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
        memory = PeakMemory(device)
        with memory:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = model(ids[:, :-1], ids[:, 1:]).loss
            loss.backward()
        peaks[mode] = memory.peak
    return {
        "preset": preset, "pe": pe, "batch": batch, "seq_len": seq_len, "dtype": dtype,
        "peak_mib": {mode: peak / 2**20 for mode, peak in peaks.items()},
        "ratio_to_none": {mode: peak / peaks["none"] for mode, peak in peaks.items()},
    }  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, sections = resolve_device(args.device), set(args.only.split(","))
    torch.manual_seed(0)
    results: dict = {"env": {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()}}
    if "graphs" in sections:
        results["graphs"] = graph_counts()
        print_table(["pe", "graphs", "breaks"], [[pe, r["graphs"], r["breaks"]] for pe, r in results["graphs"].items()])
    if "speed" in sections:
        speed = compiled_vs_eager(
            args.preset, args.pes.split(","), batch=args.batch, seq_len=args.seq_len, vocab=args.vocab, device=device,
            dtype=args.dtype, warmup=args.warmup, repeats=args.repeats,
        )  # fmt: skip
        results["speed"] = speed
        base = args.pes.split(",")[0]
        rows = [
            [pe, f"{speed['seconds_per_step'][f'{pe}/eager'] * 1e3:.1f}", f"{speed['seconds_per_step'][f'{pe}/compiled'] * 1e3:.1f}",
             f"{speed['compiled_over_eager'][pe]:.2f}", f"{speed[f'compiled_over_{base}_compiled'][pe]:.2f}",
             f"{speed['first_compiled_step_s'][pe]:.0f}"]
            for pe in args.pes.split(",")
        ]  # fmt: skip
        print_table(["pe", "eager ms", "compiled ms", "compiled/eager", f"compiled/{base} compiled", "compile s"], rows)
    if "memory" in sections:
        memory = activation_memory(args.preset, seq_len=args.memory_seq_len, batch=1, vocab=args.vocab, device=device, dtype=args.dtype)
        results["memory"] = memory
        print_table(["activation_checkpointing", "peak MiB", "ratio to none"],
                    [[mode, f"{mib:.1f}", f"{memory['ratio_to_none'][mode]:.3f}"] for mode, mib in memory["peak_mib"].items()])  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results
