"""Real train.py launches on the tiny model, and what to compare between runs (the trainer's tests)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from fope_lm.checkpoint import load_state_dict
from fope_lm.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]

TINY = [
    "model=tiny",
    "train.seq_len=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.log_interval=1",
    "train.eval_interval=6",
    "train.eval_tokens=2048",
    "train.num_threads=1",
    "train.deterministic=true",
    "optim.lr=3e-3",
    "optim.warmup_steps=3",
    "wandb.mode=disabled",
]


LAUNCH_TIMEOUT = 600  # generous: the CPU is shared with other test runs; DeepSpeed JIT-compiles once (~1-2 min)


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(args, *, data_root, runs, processes=1, deepspeed=None, fault=None, digests=False) -> tuple[list[str], dict]:
    """The command line and environment of a train.py launch (python for one process; accelerate launch for two).

    deepspeed: the accelerate config to launch with, "zero2" or "zero3" (configs/accelerate/<name>.yaml).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FOPE_", "WANDB_", "ACCELERATE_"))}
    env |= {
        "FOPE_DATA_ROOT": str(data_root),
        "PYTHONPATH": os.pathsep.join((str(REPO), str(REPO / "tests"))),  # tests/: for helpers.training.probe_hook
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    if fault:
        env["FOPE_FAULT"] = fault
    if digests:
        env["FOPE_DEBUG_DIGESTS"] = "1"
    if processes == 1:
        command = [sys.executable, "train.py"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
        command += ["--main_process_port", str(free_port())]
        if deepspeed:  # DeepSpeed needs accelerate's non-CPU path; it runs on CPU with gloo (fope_lm.training.distributed)
            command += ["--config_file", f"configs/accelerate/{deepspeed}.yaml"]
        else:
            env["ACCELERATE_USE_CPU"] = "true"
            command += ["--multi_gpu", "--num_machines", "1"]
        command += ["train.py"]
    return [*command, f"run_root={runs}", *args], env


def launch(args, *, data_root, runs, processes=1, deepspeed=None, fault=None, digests=False, expect_rc=0):
    """Run train.py to its end and return the finished process (`launch_command`'s arguments)."""
    command, env = launch_command(
        args, data_root=data_root, runs=runs, processes=processes, deepspeed=deepspeed, fault=fault, digests=digests
    )
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    output = result.stdout + result.stderr
    if expect_rc == "nonzero":
        assert result.returncode != 0, output[-4000:]
    else:
        assert result.returncode == expect_rc, output[-6000:]
    result.output = output
    return result


def start(args, **options) -> subprocess.Popen:
    """Start train.py in the background (`launch_command`'s options); its output (stdout and stderr) on a pipe."""
    command, env = launch_command(args, **options)
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 600):
    """Poll for a marker; fail early if the process died. The timeout only guards against hangs."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before {what}:\n{process.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def trajectory(run_dir: Path) -> list[tuple]:
    """What must be identical between a straight run and an interrupted-and-resumed one."""
    return [(r["step"], r.get("train/loss"), r.get("train/grad_norm"), r.get("val/loss")) for r in read_metrics(run_dir / "metrics.jsonl")]


def assert_same_weights(a: Path, b: Path) -> None:
    state_a, state_b = load_state_dict(a), load_state_dict(b)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def digests(run_dir: Path, rank: int) -> dict:
    return json.loads((run_dir / "debug" / f"digests_rank{rank}.json").read_text())


def probe_hook(model, accelerator, step, scale=1.0):
    """An eval hook, called the way `train.eval_hooks` entries are (test_nonfinite_loss_and_eval_hooks)."""
    return {"scaled_step": step * scale, "parameters": accelerator.unwrap_model(model).num_parameters()}
