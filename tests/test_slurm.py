"""Cluster runs: the sbatch scripts (lint, and a real run under stand-ins for srun/scontrol/sbatch with a
USR1 mid-run) and the SmolLM overlays. The paper's grid, its overlays and the sweep's dry run: tests/test_sweep.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from fope_lm.nn.model import Transformer
from fope_lm.run_dir import RunDir, checkpoint_step
from fope_lm.schema import validated
from fope_lm.training.config import TrainConfig, build_model_config
from fope_lm.training.metrics import read_metrics

from conftest import REPO
from helpers.training import wait_for

SHELL_SCRIPTS = sorted(str(p) for p in (REPO / "slurm").iterdir() if p.suffix in (".sbatch", ".sh"))


@pytest.mark.slow
def test_shell_scripts_pass_bash_n_and_shellcheck():
    for script in SHELL_SCRIPTS:
        subprocess.run(["bash", "-n", script], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, "-x", *SHELL_SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the experiment overlays (the paper's grid: tests/test_sweep.py) -----------------------------------------
def compose_experiment(name: str, run_root: str = "/shared/runs"):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"+experiment={name}", f"run_root={run_root}"])


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
        "FOPE_ACCELERATE_CONFIG": "configs/accelerate/multi_gpu.yaml",  # DDP; ACCELERATE_USE_CPU puts it on the CPU
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
    checkpoint = RunDir(run_dir).latest_checkpoint()
    stopped_at = checkpoint_step(checkpoint)
    assert stopped_at == 4
    assert f"requeue {job_id}" in log.read_text()
    port = 20000 + job_id % 20000
    launcher = f"--num_machines 1 --num_processes 2 --machine_rank 0 --main_process_ip localhost --main_process_port {port} train.py"
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
    assert checkpoint_step(RunDir(run_dir).latest_checkpoint()) == 60


@pytest.mark.parametrize("pe", ["rope", "yarn", "fope"])
def test_smollm_overlays_compose_into_the_imported_shape(pe):
    """configs/experiment/smollm_135m_*_L4096.yaml (docs/smollm.md): SmolLM-135M's shape, continued at 4096 tokens from
    the imported checkpoint, on C4 prepared with SmolLM's tokenizer."""
    cfg = compose_experiment(f"smollm_135m_{pe}_L4096")
    config = validated(TrainConfig, {k: v for k, v in cfg.items() if k != "data"} | {"data": {}})
    assert config.init_from == f"/shared/runs/smollm-135m-{pe}" and config.train.seq_len == 4096 and config.pe["name"] == pe
    assert cfg.data.name == "c4-smollm" and cfg.data.tokenizer == "/shared/runs/smollm-135m-rope/tokenizer"
    model_config = build_model_config(config.model, config.pe, max_seq_len=4096, default_vocab_size=49152)
    with torch.device("meta"):
        model = Transformer(model_config)
    assert model.num_parameters() == 134_515_008 and model_config.kv_heads == 3 and model_config.tie_embeddings
