"""FoPE vs RoPE train-step time on the same model, measured side by side in one run.

FoPE's cos/sin tables are two small einsums per layer beside the matmuls, so the target ratio is 1.0.

    python scripts/bench/pe_overhead.py                      # CPU: 20m preset, 4 x 256 tokens
    python scripts/bench/pe_overhead.py --preset 60m --device cuda --dtype bf16 --batch 16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from fope_lm.bench.common import make_train_step, pick_device, print_table, time_interleaved
from fope_lm.model import build_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="20m")
    parser.add_argument("--pes", default="rope,fope", help="comma-separated; the first is the baseline")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def compare(
    preset: str, pes: list[str], *, batch: int, seq_len: int, vocab: int, device: torch.device, dtype: str, warmup: int, repeats: int
) -> dict:
    """Median seconds per train step of each PE on the same model shape and batch, interleaved; ratios vs pes[0]."""
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    steps = {}
    for pe in pes:
        with device:  # initialised where it runs: a 1b model's init on the CPU takes longer than its benchmark
            model = build_model(preset, pe=pe, vocab_size=vocab, max_seq_len=seq_len)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steps[pe] = make_train_step(model, lambda m: m(ids[:, :-1], ids[:, 1:]).loss, optimizer, device, dtype)
    medians = time_interleaved(steps, warmup, repeats)
    baseline = medians[pes[0]]
    return {
        "preset": preset,
        "batch": batch,
        "seq_len": seq_len,
        "dtype": dtype,
        "device": str(device),
        "seconds_per_step": medians,
        "ratio_vs_" + pes[0]: {k: v / baseline for k, v in medians.items()},
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    pes = args.pes.split(",")
    result = compare(
        args.preset,
        pes,
        batch=args.batch,
        seq_len=args.seq_len,
        vocab=args.vocab,
        device=device,
        dtype=args.dtype,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    medians, ratios = result["seconds_per_step"], result["ratio_vs_" + pes[0]]
    tokens = args.batch * args.seq_len
    print(
        f"# {args.preset}, {args.batch} x {args.seq_len} tokens, {args.dtype}, {device} ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    rows = [[pe, f"{t * 1000:.1f}", f"{tokens / t:,.0f}", f"{ratios[pe]:.3f}"] for pe, t in medians.items()]
    print_table(["pe", "ms/step", "tokens/s", "ratio"], rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
