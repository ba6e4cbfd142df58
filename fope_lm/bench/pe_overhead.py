"""Train-step time of every position encoding against RoPE on the same model, measured side by side in one run.

Each PE is built with the options of its configs/pe/<name>.yaml (the registry's defaults where there is none).
FoPE's cos/sin tables are two small einsums per layer beside the matmuls, so its target ratio is 1.0; the
additive-bias methods (ALiBi, KERPLE, FIRE, FoX) pay for a float (B, H, Tq, Tk) bias per query chunk and the
SDPA path that takes it, CoPE also for its gates and cumulative sums over keys.

    python scripts/bench/pe_overhead.py                      # CPU: 20m preset, 4 x 256 tokens, every PE
    python scripts/bench/pe_overhead.py --pes rope,fope --preset 60m --device cuda --dtype bf16 --batch 16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from omegaconf import OmegaConf

from fope_lm.bench.common import make_train_step, print_table, time_interleaved
from fope_lm.devices import resolve_device
from fope_lm.nn.model import build_model
from fope_lm.paths import CONFIG_DIR
from fope_lm.position import available

PE_CONFIGS = CONFIG_DIR / "pe"


def pe_options(pe: str) -> dict:
    """The options configs/pe/<pe>.yaml gives the registered encoding `pe` (none when the file is absent)."""
    path = PE_CONFIGS / f"{pe}.yaml"
    options = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}
    assert isinstance(options, dict)
    return {key: value for key, value in options.items() if key != "name"}


def all_pes() -> list[str]:
    """RoPE (the baseline) first, then every other registered encoding."""
    return ["rope", *(pe for pe in available() if pe != "rope")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="20m")
    parser.add_argument("--pes", default="all", help="comma-separated, the first is the baseline; all: rope, then every registered PE")
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
            model = build_model(preset, pe=pe, pe_options=pe_options(pe), vocab_size=vocab, max_seq_len=seq_len)
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
    device = resolve_device(args.device)
    pes = all_pes() if args.pes == "all" else args.pes.split(",")
    if unknown := sorted(set(pes) - set(available())):
        raise SystemExit(f"--pes: {unknown[0]} is not a registered position encoding; the registry has {', '.join(available())}")
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
