"""Tokens/s of scripts/prepare_data.py on a local jsonl corpus with 1 and 2 worker processes, against the ceiling of
calling the tokenizer's batch encode directly on the same texts, measured one after the other in one run.

The corpus is the embedded one (Python's docstrings) repeated to --mb megabytes of jsonl, split over several
files; the tokenizer is its 8192-token byte-level BPE (OLMo's 50k-token GPT-NeoX BPE is not reachable offline; both
are `tokenizers` BPEs). Prepare's time is the whole call: loading the files with `datasets`, tokenizing unit by unit,
assembling and hashing the shards, writing metadata. Every tokenizer call here runs on one thread
(TOKENIZERS_PARALLELISM=false, as in prepare's forked workers), so num_proc N uses N cores and the ceiling is one
core's. The projection to 10B tokens takes the num_proc 2 rate per process times the node's cores.

    python scripts/bench/prepare_throughput.py                 # ~50 MB of jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from fope_lm.bench.common import print_table
from fope_lm.data import prepare
from fope_lm.data.embedded import embedded_documents, train_embedded_tokenizer
from fope_lm.data.prepare import ENCODE_BATCH

TARGET_TOKENS = 10e9


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=50.0, help="megabytes of jsonl to prepare")
    parser.add_argument("--files", type=int, default=8, help="jsonl files the corpus is split over")
    parser.add_argument("--workers", default="1,2", help="num_proc values to time")
    parser.add_argument("--unit-documents", type=int, default=5000, help="documents per unit (work shared by the workers)")
    parser.add_argument("--node-cores", type=int, default=32, help="cores of the node the 10B-token projection is for")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def write_corpus(directory: Path, megabytes: float, n_files: int) -> tuple[list[str], list[str]]:
    """The embedded documents repeated to `megabytes` of jsonl in n_files files; returns (paths, texts)."""
    documents = list(embedded_documents())
    lines = [json.dumps({"text": text}) + "\n" for text in documents]
    texts, size, i = [], 0, 0
    while size < megabytes * 1e6:
        texts.append(documents[i % len(documents)])
        size += len(lines[i % len(lines)].encode())
        i += 1
    paths = []
    for f in range(n_files):
        path = directory / f"corpus_{f:02d}.jsonl"
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts[f::n_files]))
        paths.append(str(path))
    ordered = [text for f in range(n_files) for text in texts[f::n_files]]  # the files' order
    return paths, ordered


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per tokenizer call: num_proc is the cores used
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths, texts = write_corpus(tmp, args.mb, args.files)
        tokenizer = train_embedded_tokenizer(list(embedded_documents()))
        tokenizer.save_pretrained(tmp / "tokenizer")
        megabytes = sum(os.path.getsize(p) for p in paths) / 1e6

        started = time.perf_counter()
        tokens = 0
        for start in range(0, len(texts), ENCODE_BATCH):
            tokens += sum(len(ids) + 1 for ids in tokenizer(texts[start : start + ENCODE_BATCH], add_special_tokens=False)["input_ids"])
        rates = {"tokenizer batch encode (ceiling)": tokens / (time.perf_counter() - started)}

        for num_proc in workers:
            cfg = {"name": f"bench{num_proc}", "source": "files", "paths": {"train": paths[1:], "validation": paths[:1]},
                   "tokenizer": str(tmp / "tokenizer"), "root": str(tmp / "prepared")}  # fmt: skip
            started = time.perf_counter()
            out = prepare(cfg, num_proc=num_proc, unit_documents=args.unit_documents)
            seconds = time.perf_counter() - started
            metadata = json.loads((out / "metadata.json").read_text())
            prepared = sum(split["num_tokens"] for split in metadata["splits"].values())
            assert prepared == tokens, (prepared, tokens)  # the same texts: the same tokens
            rates[f"prepare_data.py, num_proc {num_proc}"] = prepared / seconds

    ceiling = rates["tokenizer batch encode (ceiling)"]
    widest = max(workers)
    per_process = rates[f"prepare_data.py, num_proc {widest}"] / widest
    hours = TARGET_TOKENS / (per_process * args.node_cores) / 3600
    result = {
        "megabytes": megabytes, "tokens": tokens, "tokens_per_s": rates,
        "ratio_vs_ceiling": {k: v / ceiling for k, v in rates.items()},
        "hours_for_10b_tokens": {"node_cores": args.node_cores, "hours": hours},
    }  # fmt: skip
    print(f"# {megabytes:.1f} MB of jsonl, {tokens:,} tokens, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print_table(["what", "tokens/s", "ratio to ceiling"], [[k, f"{v:,.0f}", f"{v / ceiling:.2f}"] for k, v in rates.items()])
    print(f"10B tokens at the num_proc {widest} rate per process on {args.node_cores} cores: {hours:.2f} h")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result
