"""Export a checkpoint as a Hugging Face model directory (see docs/hf_export.md).

    python scripts/export_hf.py runs/fope-60m-L512-s0 hf/fope-60m            # the run's newest checkpoint
    python scripts/export_hf.py runs/fope-60m-L512-s0/checkpoints/step_001000 hf/fope-60m --tokenizer data/c4/tokenizer

    python scripts/export_hf.py runs/rope-60m-L512-s0 hf/rope-60m --format native   # a LlamaForCausalLM, no remote code

Then: AutoModelForCausalLM.from_pretrained("hf/fope-60m", trust_remote_code=True) (remote code; a native export needs no
trust_remote_code); no fope_lm needed to load either. out_dir is written whole or not at all, never into a checkpoint
or a run dir, and over a non-empty directory only with --overwrite.
"""

import argparse
import sys

from fope_lm.errors import FopeError
from fope_lm.hf import export_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint dir, or a run dir (its newest complete checkpoint)")
    parser.add_argument("out_dir", help="the directory to write: new or empty (never a checkpoint or run dir, nor inside one)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir (once the new export is complete)")
    parser.add_argument("--tokenizer", help="a tokenizer dir (default: the tokenizer of the data the checkpoint was trained on)")
    parser.add_argument("--format", default="auto", choices=["auto", "native", "remote"],
                        help="native: a LlamaForCausalLM dir, no Python files (rope; yarn / linear / dynamic NTK scaling); "
                        "remote: remote code, every PE; auto (default): native where exact, else remote")  # fmt: skip
    parser.add_argument("--max-position-embeddings", type=int, metavar="N",
                        help="the longest context the export declares (config.json; lm_eval's default max_length); default: "
                        "the training length, times the scale of static length scaling (YaRN s=4 at L=1024: 4096), 16 x L0 "
                        "for dynamic scaling (a native dynamic-NTK export keeps L0 there: transformers reads it)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        out_dir = export_hf(args.checkpoint, args.out_dir, tokenizer=args.tokenizer, format=args.format, overwrite=args.overwrite,
                            max_position_embeddings=args.max_position_embeddings)  # fmt: skip
    except FopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
