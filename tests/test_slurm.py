"""Cluster runs: the sbatch scripts (lint, and a real run under stand-ins for srun/scontrol/sbatch with a
USR1 mid-run), the sweep's dry run, and every experiment overlay composing and building on the meta device."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from fope_lm import sweep
from fope_lm.checkpoint import checkpoint_step, find_latest_checkpoint
from fope_lm.config import TrainConfig, build_model_config
from fope_lm.metrics import read_metrics
from fope_lm.model import Transformer
from fope_lm.schema import validated

from conftest import REPO

SHELL_SCRIPTS = sorted(str(p) for p in (REPO / "slurm").iterdir() if p.suffix in (".sbatch", ".sh"))


@pytest.mark.slow
def test_shell_scripts_pass_bash_n_and_shellcheck():
    for script in SHELL_SCRIPTS:
        subprocess.run(["bash", "-n", script], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, "-x", *SHELL_SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the grid ---------------------------------------------------------------------------------------------
def test_experiment_configs_are_in_sync_with_the_grid():
    runs = sweep.grid()
    written = {p.stem for p in sweep.EXPERIMENT_DIR.glob("*.yaml")}
    assert written == {run.name for run in runs}, "run `python scripts/sweep.py --write-configs`"
    for run in runs:
        assert (sweep.EXPERIMENT_DIR / f"{run.name}.yaml").read_text() == run.overlay(), run.name


@pytest.mark.slow
def test_sweep_dry_run_prints_the_paper_grid_with_dependencies():
    result = subprocess.run(
        [sys.executable, "scripts/sweep.py", "--run-root", "/shared/runs"], cwd=REPO, capture_output=True, text=True, check=True
    )
    lines = result.stdout.splitlines()
    train = [line for line in lines if "slurm/train.sbatch" in line]
    evals = [line for line in lines if "slurm/eval.sbatch" in line]
    # 2 datasets x 3 sizes x 2 lengths x 4 PEs, plus 3 continuations per size
    assert len(train) == 48 + 9
    assert len(evals) == 57 + 12  # one per run, plus dynamic YaRN at eval for the 12 RoPE runs
    for pe in ("nope", "rope", "alibi", "fope"):
        for size in ("60m", "180m", "1b"):
            for length in (512, 1024):
                for data in ("c4", "books"):
                    name = f"{data}_{size}_L{length}_{pe}"
                    assert any(f"+experiment={name} run_root=/shared/runs" in line for line in train), name
                    assert any(
                        f"--dependency=afterok:${name.upper()}' " in line and f"checkpoint=/shared/runs/{name} data={data}" in line
                        for line in evals
                    )
    continuation = next(line for line in train if "+experiment=c4_180m_L1024_rope_to_yarn" in line)
    assert "--dependency=afterok:$C4_180M_L512_ROPE' " in continuation
    yarn_eval = next(line for line in evals if "eval_c4_1b_L512_rope_yarn" in line)
    assert "scaling.method=yarn scaling.dynamic=true" in yarn_eval
    extrapolation = next(line for line in evals if "checkpoint=/shared/runs/c4_60m_L1024_fope_to_fope " in line)
    assert "32768" in extrapolation


def compose_experiment(name: str, run_root: str = "/shared/runs"):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"+experiment={name}", f"run_root={run_root}"])


@pytest.mark.parametrize("name", [run.name for run in sweep.grid()])
def test_experiment_composes_and_builds_on_meta(name):
    run = next(r for r in sweep.grid() if r.name == name)
    cfg = compose_experiment(name)
    config = validated(TrainConfig, {k: v for k, v in cfg.items() if k != "data"} | {"data": {}})
    assert config.run_name == name and config.pe["name"] == run.pe and config.model.preset == run.model
    assert config.train.seq_len == run.seq_len and config.train.tokens_per_step == 524288
    assert config.optim.lr == 6e-4 and config.optim.betas == [0.9, 0.95] and config.optim.weight_decay == 0.1
    assert cfg.data.name == ("c4" if run.base in ("c4", "continuation") else "books")
    if run.base == "c4":
        assert config.train.max_steps == 19074 and config.optim.warmup_steps == 10000
    elif run.base == "books":
        assert config.train.max_steps == 10109 and config.optim.warmup_steps == 10000
    else:
        assert config.init_from == f"/shared/runs/{run.after}" and config.train.max_steps == 2000
    if run.pe == "fope":
        assert config.pe["sigma"] == sweep.FOPE_SIGMA[run.model]
    model_config = build_model_config(config.model, config.pe, max_seq_len=config.train.seq_len, default_vocab_size=50280)
    with torch.device("meta"):
        model = Transformer(model_config)
    assert model.config.padded_vocab_size == 50304
    if "yarn" in name:
        pe = model.blocks[0].attn.pe
        assert (pe.scaling.method, pe.scaling.scale, pe.scaling.original_max_seq_len, pe.scaling.attention_factor) == (
            "yarn",
            16.0,
            512,
            1.0,
        )


# --- train.sbatch under stand-ins for SLURM ----------------------------------------------------------------
STANDINS = {
    # srun: run the command once, here (a one-node allocation), dropping srun's own options
    "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    # scontrol: hostnames of the allocation, and a record of every requeue
    "scontrol": '#!/usr/bin/env bash\nif [[ "$1" == show ]]; then echo localhost; exit 0; fi\necho "$*" >> "$FAKE_SLURM_LOG"\n',
    "sbatch": '#!/usr/bin/env bash\necho "sbatch $*" >> "$FAKE_SLURM_LOG"\necho 4243\n',
}


def free_port_job_id() -> int:
    """A job id whose derived rendezvous port (20000 + id % 20000) is free now."""
    for job_id in range(4200, 4300):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", 20000 + job_id % 20000))
                return job_id
            except OSError:
                continue
    raise RuntimeError("no free port")


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 600):
    """Poll for a marker; fail early if the process died. The timeout only guards against hangs."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before {what}:\n{process.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_train_sbatch_usr1_checkpoints_requeues_and_resumes(tmp_path, embedded_data_root):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STANDINS.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm.log"
    runs = tmp_path / "runs"
    job_id = free_port_job_id()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FOPE_", "WANDB_", "ACCELERATE_", "SLURM_"))}
    env |= {
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        "FAKE_SLURM_LOG": str(log),
        "SLURM_JOB_ID": str(job_id),
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_SUBMIT_DIR": str(REPO),
        "FOPE_GPUS_PER_NODE": "2",
        "FOPE_ACCELERATE_CONFIG": "configs/accelerate/cpu.yaml",
        "FOPE_RUN_ROOT": str(runs),
        "FOPE_DATA_ROOT": str(embedded_data_root),
        "FOPE_VENV": str(Path(sys.executable).parent.parent),
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": str(REPO),
        "FOPE_FAULT": "hold_at_step:4",  # the run waits at step 4 for the stop request: it is certainly still running
    }
    overrides = [
        f"run_root={runs}",
        "run_name=slurm-test",
        "model=tiny",
        "train.seq_len=32",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.max_steps=60",
        "train.log_interval=1",
        "train.eval_interval=1000",
        "train.save_interval=1000",
        "train.num_threads=1",
        "optim.warmup_steps=2",
    ]
    run_dir = runs / "slurm-test"
    metrics = run_dir / "metrics.jsonl"

    def steps_logged() -> list[int]:
        return [r["step"] for r in read_metrics(metrics) if "train/loss" in r] if metrics.exists() else []

    first = subprocess.Popen(
        ["bash", "slurm/train.sbatch", *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for(lambda: len(steps_logged()) >= 3, "step 3 in metrics.jsonl", first)
    first.send_signal(signal.SIGUSR1)  # what SLURM sends to the batch shell before the time limit
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-4000:]
    checkpoint = find_latest_checkpoint(run_dir)
    stopped_at = checkpoint_step(checkpoint)
    assert stopped_at == 4
    assert f"requeue {job_id}" in log.read_text()
    port = 20000 + job_id % 20000
    launcher = (
        f"--num_machines 1 --num_processes 2 --machine_rank 0 --main_process_ip localhost --main_process_port {port} "
        "--rdzv_backend c10d --multi_gpu"
    )
    assert launcher in output, output[-4000:]
    assert f"resume=auto train.stop_file={runs}/.slurm/{job_id}.stop" in output

    # the requeued job: same job id, so the same run dir; resume=auto continues from the checkpoint
    second = subprocess.run(
        ["bash", "slurm/train.sbatch", *overrides],
        cwd=REPO,
        env={k: v for k, v in env.items() if k != "FOPE_FAULT"} | {"SLURM_RESTART_COUNT": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    steps = steps_logged()
    assert steps[-1] == 60
    resumed = steps[steps.index(stopped_at) + 1 :]
    assert resumed == list(range(stopped_at + 1, 61)), "the resumed run continues at the next step"
    assert log.read_text().count("requeue") == 1  # no USR1 the second time: no requeue
    assert checkpoint_step(find_latest_checkpoint(run_dir)) == 60
