"""The spectrum of a checkpoint's attention logits over relative distance, per layer and head.

For each head: the mean pre-softmax logit at distance 0 .. 4L-1 (L = the checkpoint's max_seq_len) on
4L-token validation sequences, its rfft over distance, and per layer the share of energy below 2*pi/L
(the components the FoPE paper calls under-trained). See fope_lm/evaluation/spectrum.py for the definitions.

    python scripts/analyze_spectrum.py runs/fope/checkpoints/step_010000 --out analysis/fope
    python scripts/analyze_spectrum.py CKPT --data-dir data/c4-olmo --sequences 16 --device cuda --out analysis/c4
    python scripts/analyze_spectrum.py CKPT --tokens val_tokens.npy --out /tmp/spectrum

Writes spectrum.json (one low-frequency fraction per layer, per-head fractions, the PE's own frequencies),
spectrum.npz (mean-logit curves and energies) and spectrum.png (heads x frequency heat maps) into --out.
"""

from __future__ import annotations

import argparse
import sys

from fope_lm.errors import FopeError
from fope_lm.evaluation.runner import resolve_device
from fope_lm.evaluation.spectrum import analyze_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint", help="a checkpoint dir (model.safetensors + model_config.json), or a run dir: its newest complete one"
    )
    parser.add_argument("--out", required=True, help="output dir for spectrum.json / .npz / .png")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--data-dir", help="a prepared dataset (its validation split); default: the one the checkpoint records")
    text.add_argument("--tokens", help="a 1-D .npy array of token ids instead of a prepared dataset")
    parser.add_argument("--sequences", type=int, default=8, help="number of 4L-token sequences to average over")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        summary = analyze_checkpoint(
            args.checkpoint,
            args.out,
            data_dir=args.data_dir,
            tokens=args.tokens,
            n_sequences=args.sequences,
            batch_size=args.batch_size,
            device=device,
        )
    except FopeError as err:  # a bad checkpoint or data: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    fractions = ", ".join("n/a" if f is None else f"{f:.3f}" for f in summary["low_frequency_fraction"])
    print(f"{summary['pe']} (L={summary['train_seq_len']}): energy fraction below 2*pi/L per layer: {fractions}")
    print(f"loss on {summary['n_sequences']} x {summary['n_distances']} tokens: {summary['loss']:.4f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
