"""Every registered position encoding trains two steps under one distributed engine, all in one 2-process launch
(tests/test_engines.py runs it through `accelerate launch`):

  deepspeed  ZeRO-2 with bf16 weights: configs/deepspeed/zero2.json filled by `fill_deepspeed_config`, the Accelerator
             of `build_accelerator` (gloo on CPU); the loss chunked (train.loss_chunk_size) over packed documents
  ddp        DDP with bf16 autocast and the model compiled in place (`model.compile()`, inductor), as train.compile does

The step is the trainer's (`Trainer.train_step`): the learning rate set before backward, the summed loss scaled by
grad_accum * world_size / global target count, `accelerator.backward`, `clip_grad_norm_`, the optimizer step. One
Accelerator serves every encoding: `accelerator.free_memory()` between them releases the DeepSpeed engine (accelerate
ties one engine to an Accelerator for `backward`; free_memory is its documented way to train another model). Each
step runs on the same rows, so a loss that changes between the two steps shows that the first one updated the model.

`launch` runs it (python -m accelerate.commands.launch ... engines.py ENGINE OUT [PE ...]); rank 0 writes one record
per encoding to OUT, which the test asserts on. A failing encoding is recorded (its error's type, message and frame)
and the next one runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import set_seed

from fope_lm.faults import tensor_digest
from fope_lm.nn.documents import Documents
from fope_lm.nn.model import build_model
from fope_lm.position import available
from fope_lm.schema import validated
from fope_lm.training.config import TrainConfig
from fope_lm.training.distributed import (
    broadcast_buffers,
    build_accelerator,
    deepspeed_config_path,
    fill_deepspeed_config,
    mixed_precision,
    uses_deepspeed,
)
from fope_lm.training.optim import build_optimizer, learning_rate, set_learning_rate
from fope_lm.training.trainer import accumulate_gradients

from helpers.training import LAUNCH_TIMEOUT, REPO, TINY, compose_config, free_port

STEPS = 2
EOS = 0
ENGINES = {
    "deepspeed": ["train.loss_chunk_size=16", "train.document_mask=true"],  # zero2.json: the launch's accelerate config
    "ddp": ["train.compile=true"],
}


def config_for(engine: str) -> TrainConfig:
    overrides = [*TINY, "train.micro_batch_size=2", "train.global_batch_size=4", "train.precision=bf16", f"train.max_steps={STEPS}"]
    return validated(TrainConfig, compose_config([*overrides, "run_root=unused", *ENGINES[engine]]))


def rows_of_rank(rank: int, micro_batch_size: int, seq_len: int) -> torch.Tensor:
    """This rank's rows (seq_len + 1 tokens each), a few documents per row (EOS = 0)."""
    generator = torch.Generator().manual_seed(1000 + rank)
    rows = torch.randint(1, 256, (micro_batch_size, seq_len + 1), generator=generator)
    rows[:, [7, 19]] = EOS
    return rows


def weights(model, deepspeed: bool) -> dict[str, torch.Tensor]:
    """Every parameter in float32: under DeepSpeed the fp32 master copy (gathered from its ZeRO partitions)."""
    if not deepspeed:
        return {name: p.detach().float().clone() for name, p in model.named_parameters()}
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().float().clone() for name, p in model.named_parameters()}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    return tensor_digest(torch.cat([t.flatten() for t in tensors.values()]))


def train_one(pe: str, accelerator, config: TrainConfig, *, grad_accum: int) -> dict:
    train, optim = config.train, config.optim
    deepspeed, device = uses_deepspeed(accelerator), accelerator.device
    rank, world_size = accelerator.process_index, accelerator.num_processes
    record: dict = {}
    if train.compile:
        torch._dynamo.reset()  # a fresh compile per encoding (each would otherwise count against the recompile limit)
        counters = torch._dynamo.utils.counters
        counters.clear()
    set_seed(config.seed)  # the same initial weights on every rank, as the trainer's _build_model
    model = build_model("tiny", pe=pe, vocab_size=256, max_seq_len=train.seq_len, n_layers=1)
    model.to(device)
    if train.compile:
        model.compile()  # in place, as the trainer does
    # the bytes per element of a projection's output, written by a hook that compiles into the graph (a tensor it
    # fills, not Python state, which dynamo would guard on and recompile for): 2 under bf16 autocast
    itemsize = torch.zeros((), device=device)

    def record_itemsize(module, args, output) -> None:
        itemsize.fill_(output.element_size())

    model.blocks[0].attn.qkv.register_forward_hook(record_itemsize)
    model, optimizer = accelerator.prepare(model, build_optimizer(model, optim))
    unwrapped = accelerator.unwrap_model(model)
    if deepspeed:
        broadcast_buffers(unwrapped)
        record["bf16_enabled"] = bool(model.bfloat16_enabled())
    record["param_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in unwrapped.parameters()})
    initial = weights(model, deepspeed)

    rows = rows_of_rank(rank, train.micro_batch_size, train.seq_len)
    documents = {}
    if train.uses_documents:  # found on the host, as the trainer's document_kwargs
        documents = {
            "doc_ids": Documents.of_tokens(rows[:, :-1], EOS).to(device),
            "document_mask": train.document_mask,
            "restart_positions": train.restart_positions,
        }
    losses, norms = [], []
    for step in range(1, STEPS + 1):
        lr = learning_rate(step, peak=optim.lr, warmup_steps=optim.warmup_steps, max_steps=train.max_steps, alpha_f=optim.alpha_f)
        set_learning_rate(optimizer, lr)  # before backward: DeepSpeed steps inside it
        labels = rows[:, 1:].to(device)
        loss, global_targets = accumulate_gradients(  # the trainer's own forward/backward, one micro-batch per rank
            accelerator, model, labels, [(rows[:, :-1].to(device), labels, documents)],
            grad_accum=grad_accum, world_size=world_size, loss_chunk_size=train.loss_chunk_size,
        )  # fmt: skip
        norm = accelerator.clip_grad_norm_(model.parameters(), train.grad_clip or float("inf"))
        losses.append((accelerator.reduce(loss, reduction="sum") / global_targets).item())
        norms.append(None if norm is None else float(norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    final = weights(model, deepspeed)
    record |= {
        "losses": losses,
        "grad_norms": norms,
        "projection_itemsize": itemsize.item(),
        "unchanged": [name for name in final if torch.equal(final[name], initial[name])],
        "n_parameters": len(final),
        "digest": digest(final),
        "digest_module": digest({n: p.detach().float() for n, p in unwrapped.named_parameters()}),
        "digest_buffers": digest({n: b.float() for n, b in unwrapped.named_buffers()} or {"none": torch.zeros(1)}),
    }
    if train.compile:
        record["graph_breaks"] = sum(counters["graph_break"].values())
        record["graphs"] = counters["stats"]["unique_graphs"]
        record["break_reasons"] = sorted(counters["graph_break"])[:5]
    return record


def main(engine: str, out: Path, names: list[str]) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    config = config_for(engine)
    train = config.train
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    grad_accum = train.global_batch_size // (train.micro_batch_size * world_size)
    precision = mixed_precision(train.precision)
    path = deepspeed_config_path(train.deepspeed)
    ds_config = (
        None if path is None else fill_deepspeed_config(path, train, grad_accum=grad_accum, world_size=world_size, precision=precision)
    )
    accelerator = build_accelerator(precision, grad_accum, ds_config)
    assert uses_deepspeed(accelerator) == (engine == "deepspeed") and accelerator.num_processes == 2, accelerator.distributed_type

    results: dict[str, dict] = {}
    started = time.perf_counter()
    for pe in names:
        begin = time.perf_counter()
        try:
            record = train_one(pe, accelerator, config, grad_accum=grad_accum)
        except Exception as exc:  # recorded; the next encoding runs
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            record = {
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                "at": f"{frame.filename}:{frame.lineno}",
            }
        accelerator.free_memory()
        record["seconds"] = round(time.perf_counter() - begin, 2)
        gathered: list = [None] * accelerator.num_processes
        dist.all_gather_object(gathered, {k: record.get(k) for k in ("digest", "digest_module", "digest_buffers", "error")})
        record["ranks"] = gathered
        results[pe] = record
        if accelerator.is_main_process:
            losses = record.get("losses")
            shown = "" if losses is None else " ".join(f"{x:.4f}" if math.isfinite(x) else str(x) for x in losses)
            print(f"[{engine}] {pe}: {record['seconds']:.1f} s  {record.get('error') or 'losses ' + shown}", flush=True)
    if accelerator.is_main_process:
        out.write_text(json.dumps({"engine": engine, "seconds": round(time.perf_counter() - started, 2), "results": results}, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def launch(engine: str, out: Path, *, inductor_cache: Path, names: list[str] | None = None) -> dict:
    """Run this script on 2 processes: DeepSpeed through configs/accelerate/zero2.yaml, DDP on accelerate's CPU path.
    Returns OUT's content, with the launch's output (per-encoding timings) under "output"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FOPE_", "WANDB_", "ACCELERATE_"))}
    env |= {
        "PYTHONPATH": os.pathsep.join((str(REPO), str(REPO / "tests"))),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache),
    }
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port", str(free_port())]
    if engine == "deepspeed":  # DeepSpeed needs accelerate's non-CPU path; it runs on CPU with gloo
        command += ["--config_file", "configs/accelerate/zero2.yaml"]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        command += ["--multi_gpu", "--num_machines", "1"]
    command += [str(Path(__file__).resolve()), engine, str(out), *(names or [])]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and out.is_file(), output[-6000:]
    return json.loads(out.read_text()) | {"output": result.stdout}


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:] or available())
