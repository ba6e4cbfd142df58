"""Import a local LlamaForCausalLM directory (SmolLM, TinyLlama, ...) as a checkpoint dir (docs/smollm.md).

    python scripts/import_hf.py /models/SmolLM-135M runs/smollm-135m-rope                       # RoPE, logits equal the source's
    python scripts/import_hf.py /models/SmolLM-135M runs/smollm-135m-fope --pe fope --max-seq-len 2048
    python scripts/import_hf.py /models/SmolLM-135M runs/smollm-135m-yarn --pe yarn --pe-option scale=4

The output loads with fope_lm.checkpoint.load_model, evaluates with eval.py and starts runs with init_from=; its
tokenizer/ prepares data (tokenizer=OUT_DIR/tokenizer). Only safetensors weights are read (convert a pickle
pytorch_model.bin where you trust it) and none of the source's own code runs: a tokenizer that asks for it is refused.
"""

import argparse
import sys

import yaml

from fope_lm.errors import FopeError
from fope_lm.hf.llama import import_llama


def parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--pe-option takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, yaml.safe_load(value)  # 0.3 -> float, true -> bool, null -> None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a local Hugging Face LlamaForCausalLM directory (config.json + safetensors weights)")
    parser.add_argument("out_dir", help="the checkpoint directory to write: new or empty (never a checkpoint or run dir, nor inside one)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir (once the new checkpoint is complete)")
    parser.add_argument("--pe", help="replace RoPE by this position encoding (fope, yarn, rope_clip, ...); default: rope")
    parser.add_argument("--pe-option", action="append", type=parse_option, default=[], metavar="KEY=VALUE", help="an option of --pe")
    parser.add_argument("--max-seq-len", type=int, help="the training length L (FoPE's floor 2 pi / L); default: the source's")
    args = parser.parse_args(argv)
    try:
        out = import_llama(args.source, args.out_dir, pe=args.pe, pe_options=dict(args.pe_option), max_seq_len=args.max_seq_len,
                           overwrite=args.overwrite)  # fmt: skip
    except FopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"imported {args.source} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
