"""The GPU benchmark set in one run, about 4 minutes on one H200: the numbers of docs/benchmarks.md's GPU section.

    python scripts/bench/gpu_suite.py --out gpu.json      # on a CUDA machine
    python scripts/bench/gpu_suite.py --dry-run           # every configuration on CPU at toy sizes, in seconds
    python scripts/bench/gpu_suite.py --report gpu.json   # the results as the markdown tables of docs/benchmarks.md

On the GPU, with bf16 autocast (float32 weights and AdamW, as the trainer runs), vocab 50280, it measures:
  step_vs_hf    train-step time (forward + backward + AdamW) of our `20m` and `60m` against transformers'
                OlmoForCausalLM of the same shapes, 16 x 1024 tokens, steps interleaved: ratio ours / hf;
  pe_overhead   FoPE against RoPE train-step time, `60m` and `1b`, 16 x 1024 tokens, interleaved: ratio fope / rope;
  eval_memory   the eval forward of `60m` (trained length 512; batch 1, no_grad, the loss over all T targets with
                the LM head in chunks of 1024 positions) at T = 1k, 2k, ..., 64k for rope, nope, alibi and fope,
                after a warm-up at 64k, round-robin at each T: torch.cuda.max_memory_allocated above what was
                allocated before the forward, and time per token;
  mfu           train-step tokens/s, peak memory and MFU = tokens/s x model.flops_per_token(T) (6N + 12 x layers x
                d_model x T) / the GPU's peak dense bf16 FLOP/s (fope_lm.training.metrics.PEAK_BF16_TFLOPS: H100 SXM and
                H200 989e12, A100 312e12, ...) of `60m`, `180m` and `1b` (RoPE; --mfu-pe) at T = 512 and 1024,
                16384 tokens per step, eager and torch.compile'd (in place, as train.compile does; the compiling
                first step is reported apart), with PyTorch SDPA, and with flash-attn when it is installed (else
                those configurations are recorded as skipped); each as the trainer steps (its AdamW settings, fused on
                CUDA; TF32; the chunked LM-head loss) with the kernels it chose recorded (`attention_kernels`), plus
                the smallest preset on packed documents (masked, restarting positions: flash-attn's varlen kernel).

Every configuration writes one JSON line to --out as soon as it finishes (flushed), with its status: ok, skipped
(and why) or error (e.g. out of memory; the suite goes on). Time boxes: a group's configurations run smallest
first, and once one takes longer than the group's budget the larger ones are skipped; nothing starts after
--budget seconds. --only runs some groups (e.g. a second run for what the first one skipped).

It imports torch, transformers, fope_lm's model code and fope_lm.training.metrics's peak table (no Hydra or accelerate
start-up). Models are initialised on the device they run on. With --dry-run
the same code runs on CPU in fp32 with the `tiny` preset, tiny lengths, one timed step, and compile's graph
capture without code generation (backend "eager"), so that a test keeps it from rotting.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch._functorch.config
import transformers
from omegaconf import OmegaConf

import fope_lm.nn.attention
from fope_lm.bench import eval_memory, pe_overhead, step_vs_hf
from fope_lm.bench.common import make_train_step, print_table, time_interleaved
from fope_lm.bench.graphs import graph_breaks
from fope_lm.nn.attention import attention_kernels
from fope_lm.nn.documents import Documents
from fope_lm.nn.model import build_model
from fope_lm.paths import CONFIG_DIR
from fope_lm.position import available
from fope_lm.schema import validated
from fope_lm.training.config import OptimSection
from fope_lm.training.metrics import peak_flops
from fope_lm.training.optim import build_optimizer

GROUPS = ("graphs", "step_vs_hf", "pe_overhead", "eval_memory", "mfu")


@dataclass
class Sizes:
    """Everything that differs between the GPU run and the dry run."""

    device: str
    dtype: str
    vocab: int
    hf_presets: list[str]
    pe_presets: list[str]
    mfu_presets: list[str]
    train_lens: list[int]
    tokens_per_step: int
    eval_preset: str
    eval_lens: list[int]
    loss_chunk: int
    warmup: int
    steps: int
    compile_backend: str
    budgets: dict[str, float]  # seconds per configuration, by group


GPU = Sizes(
    device="cuda",
    dtype="bf16",
    vocab=50280,
    hf_presets=["20m", "60m"],
    pe_presets=["60m", "1b"],
    mfu_presets=["60m", "180m", "1b"],
    train_lens=[512, 1024],
    tokens_per_step=16384,
    eval_preset="60m",
    eval_lens=[1024 * 2**i for i in range(7)],
    loss_chunk=1024,
    warmup=3,
    steps=10,
    compile_backend="inductor",
    budgets={"step_vs_hf": 20, "pe_overhead": 30, "eval_memory": 30, "mfu": 20, "mfu_compile": 90},
)
DRY = Sizes(
    device="cpu",
    dtype="fp32",
    vocab=512,
    hf_presets=["tiny"],
    pe_presets=["tiny"],
    mfu_presets=["tiny"],
    train_lens=[32, 64],
    tokens_per_step=128,
    eval_preset="tiny",
    eval_lens=[64, 128],
    loss_chunk=32,
    warmup=1,
    steps=1,
    compile_backend="eager",
    budgets={"step_vs_hf": 60, "pe_overhead": 60, "eval_memory": 60, "mfu": 60, "mfu_compile": 60},
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu.json", help="JSON lines, one per configuration")
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: check that every configuration runs")
    parser.add_argument("--budget", type=float, default=240.0, help="no configuration starts after this many seconds")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of {', '.join(GROUPS)}")
    parser.add_argument("--mfu-pe", default="rope", help="the position encoding of the mfu models")
    parser.add_argument("--report", metavar="JSON", help="print a finished run's JSON lines as markdown tables, run nothing")
    return parser.parse_args(argv)


class Suite:
    """Runs configurations in order, time-boxed, appending one JSON line per configuration to `out`."""

    def __init__(self, out, budget: float):
        self.out = out
        self.started = time.perf_counter()
        self.budget = budget
        self.over_budget: set[str] = set()  # groups in which a configuration overran its budget

    def run(self, group: str, config: dict, fn, *, budget: float, skip: str | None = None) -> None:
        record: dict[str, Any] = {"group": group, "config": config}
        elapsed = time.perf_counter() - self.started
        if skip is None and group in self.over_budget:
            skip = f"a smaller {group} configuration took longer than its {budget:.0f} s budget"
        if skip is None and elapsed > self.budget:
            skip = f"the suite's {self.budget:.0f} s budget is spent"
        if skip is not None:
            self.write({**record, "status": "skipped", "reason": skip})
            return
        start = time.perf_counter()
        try:
            record |= {"status": "ok", "result": fn()}
        except Exception as exc:  # out of memory, a kernel that does not support a shape: record it, go on
            record |= {"status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        record["seconds"] = time.perf_counter() - start
        if record["seconds"] > budget:
            self.over_budget.add(group)
        self.write(record)

    def write(self, record: dict) -> None:
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()
        summary = record.get("result", record.get("reason", record.get("error")))
        print(
            f"[{time.perf_counter() - self.started:6.1f}s] {record['group']} {record['config']}: {record['status']} {summary}", flush=True
        )


def mfu_step(
    preset: str, seq_len: int, *, pe: str, compile: bool, kernel: str, sizes: Sizes, device: torch.device, documents: bool = False
) -> dict:
    """Tokens/s and MFU of our model's train step as the trainer runs it (its AdamW settings, TF32, the chunked loss,
    `set_attention`); with compile, the first (compiling) step is timed apart. documents: rows packed with a document
    every ~seq_len/4 tokens, masked and with restarting positions (flash-attn's varlen kernel)."""
    torch.manual_seed(0)
    batch = sizes.tokens_per_step // seq_len
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # train.tf32's default
    with device:  # initialised where it runs: a 1b model's init on the CPU takes longer than its benchmark
        model = build_model(preset, pe=pe, vocab_size=sizes.vocab, max_seq_len=seq_len).train()
    model.set_attention(kernel, device)
    kernels = attention_kernels(model)
    if compile:
        torch._dynamo.reset()  # each configuration compiles its own static-shape graphs, as a training run does
        model.compile(backend=sizes.compile_backend)
    ids = torch.randint(1, sizes.vocab, (batch, seq_len + 1))
    forward: dict[str, Any] = {}
    if documents:
        ids[:, :: max(2, seq_len // 4)] = 0  # EOS: a few documents per row
        forward = {"doc_ids": Documents.of_tokens(ids[:, :-1], 0).to(device)}
    ids = ids.to(device)
    optimizer = build_optimizer(model, trainer_optim_settings())
    step = make_train_step(model, lambda m: m(ids[:, :-1], ids[:, 1:], **forward).loss, optimizer, device, sizes.dtype)
    first_step = step()
    seconds = time_interleaved({"step": step}, sizes.warmup, sizes.steps)["step"]
    tokens_per_s = batch * seq_len / seconds
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    flops = model.flops_per_token(seq_len)
    return {
        "batch": batch,
        "step_s": seconds,
        "first_step_s": first_step,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "mfu": tokens_per_s * flops / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "kernels": kernels,
    }


def trainer_optim_settings() -> OptimSection:
    """The optimizer section of configs/train.yaml, as a training run gets it (fused AdamW on CUDA)."""
    return validated(OptimSection, OmegaConf.load(CONFIG_DIR / "train.yaml").optim)


def forward_graphs(preset: str, pe: str, sizes: Sizes, device: torch.device) -> dict:
    """Graphs and breaks of one training forward (dynamo only: no code generation)."""
    with device:
        model = build_model(preset, pe=pe, vocab_size=sizes.vocab, max_seq_len=sizes.train_lens[0])
    ids = torch.randint(0, sizes.vocab, (1, sizes.train_lens[0] + 1), device=device)
    return graph_breaks(model, ids[:, :-1], ids[:, 1:])


def eval_length(length: int, models: dict, ids: torch.Tensor, sizes: Sizes, device: torch.device) -> dict:
    """eval_memory at one length: one forward per PE, round-robin."""
    rounds = eval_memory.eval_round(models, ids, length, loss_chunk=sizes.loss_chunk, device=device, dtype=sizes.dtype)
    return {pe: {"peak_mib": peak / 2**20, "us_per_token": seconds / length * 1e6} for pe, (seconds, peak) in rounds.items()}


def report(path: str) -> None:
    """Markdown tables of a run's JSON lines, one per group, as docs/benchmarks.md shows them."""
    with open(path) as f:
        env, *records = [json.loads(line) for line in f]
    e = env["result"]
    print(f"# {e['device']}, torch {e['torch']}, transformers {e['transformers']}, CUDA {e['cuda']}, flash-attn {e['flash_attn']}")
    ms = lambda seconds: f"{seconds * 1e3:.1f}"  # noqa: E731
    pes = ("rope", "nope", "alibi", "fope")
    tables = {  # group: (key columns, value columns, value cells of a result)
        "graphs": (["preset", "pe"], ["graphs", "breaks"], lambda r: [r["graphs"], r["breaks"]]),
        "step_vs_hf": (
            ["preset"],
            ["fope_lm ms/step", "hf Olmo ms/step", "ours / hf"],
            lambda r: [ms(r["ours_s"]), ms(r["hf_s"]), f"{r['ratio']:.3f}"],
        ),
        "pe_overhead": (
            ["preset"],
            ["rope ms/step", "fope ms/step", "fope / rope"],
            lambda r: [ms(r["seconds_per_step"]["rope"]), ms(r["seconds_per_step"]["fope"]), f"{r['ratio_vs_rope']['fope']:.3f}"],
        ),
        "eval_memory": (
            ["seq_len"],
            [f"{pe} MiB, us/token" for pe in pes],
            lambda r: [f"{r[pe]['peak_mib']:.0f}, {r[pe]['us_per_token']:.2f}" for pe in pes],
        ),
        "mfu": (
            ["preset", "seq_len", "pe", "compile", "attention"],
            ["tokens/s", "MFU", "first step s", "peak GiB"],
            lambda r: [
                f"{r['tokens_per_s']:,.0f}",
                f"{r['mfu']:.1%}" if r["mfu"] is not None else "-",
                f"{r['first_step_s']:.1f}",
                f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-",
            ],
        ),
    }
    for group, (keys, columns, cells) in tables.items():
        rows = []
        for record in (r for r in records if r["group"].removesuffix("_compile") == group):
            values = cells(record["result"]) if record["status"] == "ok" else [record["status"], record.get("reason", record.get("error"))]
            rows.append([record["config"][key] for key in keys] + values + [""] * (len(columns) - len(values)))
        if rows:
            print_table(keys + columns, rows)
            print()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        return report(args.report)
    sizes = DRY if args.dry_run else GPU
    if sizes.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --dry-run")
    device = torch.device(sizes.device)
    groups = set(args.only.split(","))
    with open(args.out, "w") as out:
        run_groups(Suite(out, args.budget), groups, sizes, device, args.mfu_pe)
    print(f"wrote {args.out}")


def run_groups(suite: Suite, groups: set[str], sizes: Sizes, device: torch.device, mfu_pe: str) -> None:
    flash_installed = fope_lm.nn.attention.flash_attn_funcs() is not None
    suite.write(
        {
            "group": "env",
            "config": {},
            "status": "ok",
            "result": {
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
                "peak_bf16_flops": peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "cuda": torch.version.cuda,
                "flash_attn": flash_installed,
                "cpu_threads": torch.get_num_threads(),
                "dry_run": sizes is DRY,
            },
        }
    )
    common: dict[str, Any] = dict(device=device, dtype=sizes.dtype, vocab=sizes.vocab)
    long_len = sizes.train_lens[-1]
    batch = sizes.tokens_per_step // long_len

    if "graphs" in groups:  # what torch.compile sees of each training forward: one graph, no breaks, for every PE
        for preset, pe in [("tiny", pe) for pe in available()] + [(preset, mfu_pe) for preset in sizes.mfu_presets]:
            suite.run("graphs", {"preset": preset, "pe": pe}, functools.partial(forward_graphs, preset, pe, sizes, device), budget=60)

    if "step_vs_hf" in groups:
        for preset in sizes.hf_presets:
            suite.run(
                "step_vs_hf",
                {"preset": preset, "batch": batch, "seq_len": long_len},
                functools.partial(
                    step_vs_hf.compare, preset, **common, batch=batch, seq_len=long_len, warmup=sizes.warmup, steps=sizes.steps
                ),
                budget=sizes.budgets["step_vs_hf"],
            )

    if "pe_overhead" in groups:
        for preset in sizes.pe_presets:
            suite.run(
                "pe_overhead",
                {"preset": preset, "batch": batch, "seq_len": long_len},
                functools.partial(
                    pe_overhead.compare,
                    preset,
                    ["rope", "fope"],
                    **common,
                    batch=batch,
                    seq_len=long_len,
                    warmup=sizes.warmup,
                    repeats=sizes.steps,
                ),  # fmt: skip
                budget=sizes.budgets["pe_overhead"],
            )

    if "eval_memory" in groups:
        pes = ["rope", "nope", "alibi", "fope"]
        models, ids = eval_memory.warmed_up_models(
            sizes.eval_preset, pes, vocab=sizes.vocab, train_len=sizes.train_lens[0], max_len=sizes.eval_lens[-1],
            loss_chunk=sizes.loss_chunk, device=device, dtype=sizes.dtype,
        )  # fmt: skip
        for length in sizes.eval_lens:
            suite.run(
                "eval_memory",
                {"preset": sizes.eval_preset, "seq_len": length, "loss_chunk": sizes.loss_chunk},
                functools.partial(eval_length, length, models, ids, sizes, device),
                budget=sizes.budgets["eval_memory"],
            )
        del models, ids

    if "mfu" in groups:
        for compile in (False, True):
            for kernel in ("sdpa", "flash"):
                group = "mfu_compile" if compile else "mfu"
                skip = None
                if kernel == "flash" and not (flash_installed and device.type == "cuda"):
                    skip = "flash-attn is not installed" if not flash_installed else "flash-attn needs CUDA"
                for preset in sizes.mfu_presets:
                    for seq_len in sizes.train_lens:
                        config = {"preset": preset, "seq_len": seq_len, "pe": mfu_pe, "compile": compile, "attention": kernel}
                        suite.run(
                            group,
                            config,
                            functools.partial(
                                mfu_step, preset, seq_len, pe=mfu_pe, compile=compile, kernel=kernel, sizes=sizes, device=device
                            ),
                            budget=sizes.budgets[group],
                            skip=skip,
                        )
                # packed documents (masked, positions restarting): flash-attn's varlen kernel, or SDPA's mask
                preset, seq_len = sizes.mfu_presets[0], sizes.train_lens[-1]
                config = {"preset": preset, "seq_len": seq_len, "pe": mfu_pe, "compile": compile, "attention": f"{kernel}+documents"}
                suite.run(
                    group,
                    config,
                    functools.partial(
                        mfu_step, preset, seq_len, pe=mfu_pe, compile=compile, kernel=kernel, sizes=sizes, device=device, documents=True
                    ),
                    budget=sizes.budgets[group],
                    skip=skip,
                )
