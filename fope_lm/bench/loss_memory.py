"""Peak memory of one training forward + backward with the loss over the whole (B*T, V) float32 logits, and with the
LM head + cross-entropy in chunks of token rows (the model's default, `loss_chunk_size` null: LOSS_CHUNK_ELEMENTS // V
rows), at a few (B, T) shapes of one model. Two chunked contenders: "chunked", the model's path, each chunk's
gradients computed in forward (`ChunkedLinearCrossEntropy`); "recomputed", its path for a head weight sharded outside
lm_head's call, each chunk checkpointed and its logits recomputed in backward.

Memory, above what was in use just before the forward: CPU, the peak of the tensor storage alive, counted op by op
(`LiveTensorBytes` in eval_memory.py: exact, the same on every machine); CUDA, torch.cuda.max_memory_allocated. Both
include the parameters' gradients, which backward allocates (the same in both contenders). On CUDA with liger-kernel
installed, a third contender is its fused linear cross-entropy (the model's choice there).
Time per step (forward + backward, no optimizer), interleaved round-robin after the memory runs (--repeats 0: none):
the recomputed logits cost one more LM-head matmul per token.

    python scripts/bench/loss_memory.py                                  # CPU: 20m, V = 50304, 4x512 .. 8x1024
    python scripts/bench/loss_memory.py --preset 60m --device cuda --dtype bf16 --shapes 16x1024,32x1024
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from fope_lm.bench.common import autocast, print_table, synchronize, time_interleaved
from fope_lm.bench.eval_memory import PeakMemory
from fope_lm.devices import resolve_device
from fope_lm.nn.model import build_model, default_loss_chunk_size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="20m")
    parser.add_argument("--shapes", default="4x512,8x512,8x1024", help="comma-separated BxT")
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--chunk", type=int, default=None, help="loss_chunk_size in token rows (default: the model's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per contender and shape; 0: memory only")
    parser.add_argument("--json", help="also write the rows here")
    return parser.parse_args(argv)


def contenders(model, rows: int, chunk: int | None) -> dict[str, dict]:
    """name -> the forward's loss arguments, whether the fused kernel may be chosen, whether the head weight counts
    as all here (else the chunks are recomputed in backward)."""
    found: dict[str, dict] = {
        "whole": {"loss_chunk_size": rows, "fused": False, "recompute": False},
        "chunked": {"loss_chunk_size": chunk, "fused": False, "recompute": False},
        "recomputed": {"loss_chunk_size": chunk, "fused": False, "recompute": True},
    }
    if model.fused_loss is not None:  # CUDA with liger-kernel installed
        found["fused"] = {"loss_chunk_size": chunk, "fused": True, "recompute": False}
    return found


def train_forward_backward(
    model, ids: torch.Tensor, *, loss_chunk_size: int | None, fused: bool, recompute: bool, device, dtype: str
) -> float:
    """One forward + backward of the summed loss of ids[:, 1:]; returns the loss. Gradients are freed first."""
    model.zero_grad(set_to_none=True)
    kernel = model.fused_loss
    if not fused:
        model.fused_loss = None
    if recompute:  # the model's path for a weight gathered only inside lm_head's call
        model._head_weight_is_here = lambda: False
    try:
        with autocast(device, dtype):
            loss = model(ids[:, :-1], ids[:, 1:], loss_chunk_size=loss_chunk_size, reduction="sum").loss
        loss.backward()
    finally:
        model.fused_loss = kernel
        model.__dict__.pop("_head_weight_is_here", None)
    return float(loss.detach())


def measure_shape(model, batch: int, seq_len: int, *, vocab: int, chunk: int | None, device, dtype: str, warmup: int, repeats: int) -> dict:
    ids = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    runs = contenders(model, batch * seq_len, chunk)
    peaks, losses = {}, {}
    for name, kwargs in runs.items():
        memory = PeakMemory(device)
        with memory:
            losses[name] = train_forward_backward(model, ids, device=device, dtype=dtype, **kwargs)
        peaks[name] = memory.peak
    seconds = {}
    if repeats:

        def timed(kwargs):
            def step() -> float:
                synchronize(device)
                start = time.perf_counter()
                train_forward_backward(model, ids, device=device, dtype=dtype, **kwargs)
                synchronize(device)
                return time.perf_counter() - start

            return step

        seconds = time_interleaved({name: timed(kwargs) for name, kwargs in runs.items()}, warmup, repeats)
    model.zero_grad(set_to_none=True)
    return {
        "batch": batch, "seq_len": seq_len, "rows": batch * seq_len,
        "chunk_rows": chunk or default_loss_chunk_size(model.config.padded_vocab_size),
        "whole_logits_mib": batch * seq_len * model.config.padded_vocab_size * 4 / 2**20,
        "peak_mib": {name: peak / 2**20 for name, peak in peaks.items()},
        "ratio": peaks["chunked"] / peaks["whole"],
        "recomputed_ratio": peaks["recomputed"] / peaks["whole"],
        "loss_difference": max(abs(loss - losses["whole"]) for loss in losses.values()) / abs(losses["whole"]),
        "seconds": seconds,
        "time_ratio": seconds["chunked"] / seconds["whole"] if seconds else None,
        "recomputed_time_ratio": seconds["recomputed"] / seconds["whole"] if seconds else None,
    }  # fmt: skip


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    torch.manual_seed(0)
    with device:
        model = build_model(args.preset, pe="rope", vocab_size=args.vocab, max_seq_len=max(t for _, t in shapes))
    rows = [
        measure_shape(
            model, b, t, vocab=args.vocab, chunk=args.chunk, device=device, dtype=args.dtype, warmup=args.warmup, repeats=args.repeats
        )
        for b, t in shapes
    ]
    n_params = model.num_parameters() / 1e6
    print(
        f"# loss memory: {args.preset} ({n_params:.1f}M params), vocab {model.config.padded_vocab_size}, forward + backward of the "
        f"summed loss, {args.dtype}, {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; peak = memory above that in use before the forward (gradients included)"
    )
    names = list(rows[0]["peak_mib"])
    header = [
        "B x T",
        "rows",
        "chunk rows",
        "(B*T, V) fp32 MiB",
        *(f"{n} peak MiB" for n in names),
        "chunked / whole",
        "recomputed / whole",
    ]
    table = []
    for r in rows:
        line = [f"{r['batch']}x{r['seq_len']}", r["rows"], r["chunk_rows"], f"{r['whole_logits_mib']:.0f}"]
        table.append(line + [f"{r['peak_mib'][n]:.1f}" for n in names] + [f"{r['ratio']:.3f}", f"{r['recomputed_ratio']:.3f}"])
    print_table(header, table)
    if args.repeats:
        print_table(
            ["B x T", *(f"{n} ms" for n in names), "chunked / whole", "recomputed / whole"],
            [[f"{r['batch']}x{r['seq_len']}", *(f"{r['seconds'][n] * 1e3:.0f}" for n in names), f"{r['time_ratio']:.3f}",
              f"{r['recomputed_time_ratio']:.3f}"] for r in rows],
        )  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "dtype": args.dtype, "device": str(device), "rows": rows}, f, indent=2)
    return rows
