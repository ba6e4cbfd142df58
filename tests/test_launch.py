"""slurm/launch_node.sh resolves to the engine its accelerate config names, for every shipped config on one node and on
several. The script runs for real with a stand-in `python` first on PATH that records its arguments; those arguments
then go through accelerate's own `launch_command` (parser, validation against the config file, choice of launcher,
the launcher's environment), with only the last step, starting the processes, recorded instead of run.

No GPU is needed and none is queried: with a config file, accelerate's validation reads the engine from the file and
never counts devices (it does only without one), and its P2P check reads nvidia-smi and passes where there is none.
The port check is stubbed: whether 23456 is free on the test machine says nothing about the command.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import accelerate.commands.launch as accelerate_launch
import accelerate.utils.launch as accelerate_launch_utils
import pytest
import torch.distributed.run as torchrun
from accelerate.utils import patch_environment

from fope_lm.training.distributed import deepspeed_config_path

from conftest import REPO

# The engine each shipped accelerate config names. A new config must be added here (checked below).
ENGINES = {
    "cpu": "one process",
    "single_gpu": "one process",
    "multi_gpu": "DDP",
    "zero1": "DeepSpeed ZeRO-1",
    "zero2": "DeepSpeed ZeRO-2",
    "zero3": "DeepSpeed ZeRO-3",
}
ONE_PROCESS = {name for name, engine in ENGINES.items() if engine == "one process"}
# (nodes, processes, this node's SLURM_NODEID): one GPU, one node of 8, and the first and last of 4 such nodes
ALLOCATIONS = [(1, 1, 0), (1, 8, 0), (4, 32, 0), (4, 32, 3)]
MASTER_ADDR, MASTER_PORT = "node-000", 23456
OVERRIDES = ["resume=auto", "train.stop_file=runs/.slurm/7.stop", "+pe=fope"]
# What the allocation decides; anything else (an engine flag above all) would override the config.
ALLOCATION_OPTIONS = {
    "--config_file",
    "--num_machines",
    "--num_processes",
    "--machine_rank",
    "--main_process_ip",
    "--main_process_port",
    "--rdzv_backend",
    "--deepspeed_multinode_launcher",
}
# the stand-in `python`: writes its arguments, NUL-separated, to $ARGV_FILE
STAND_IN_PYTHON = r"""#!/usr/bin/env bash
printf '%s\0' "$@" > "$ARGV_FILE"
"""


def test_every_shipped_accelerate_config_is_covered():
    assert {p.stem for p in (REPO / "configs" / "accelerate").glob("*.yaml")} == set(ENGINES)


def run_launch_node(tmp_path: Path, config: str, nodes: int, processes: int, node: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    """slurm/launch_node.sh as srun starts it on node `node`; returns the finished script and the stand-in's argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(STAND_IN_PYTHON)
    (bin_dir / "python").chmod(0o755)
    argv_file = tmp_path / "argv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FOPE_", "SLURM_", "ACCELERATE_"))}
    env |= {
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "ARGV_FILE": str(argv_file),
        "SLURM_NODEID": str(node),
        "FOPE_ACCELERATE_CONFIG": f"configs/accelerate/{config}.yaml",  # relative, as train.sbatch sets it
        "FOPE_NUM_MACHINES": str(nodes),
        "FOPE_NUM_PROCESSES": str(processes),
        "FOPE_MASTER_ADDR": MASTER_ADDR,
        "FOPE_MASTER_PORT": str(MASTER_PORT),
    }
    script = subprocess.run(["bash", "slurm/launch_node.sh", *OVERRIDES], cwd=REPO, env=env, capture_output=True, text=True)
    argv = argv_file.read_bytes().decode().split("\0")[:-1] if argv_file.exists() else []
    return script, argv


@pytest.fixture
def accelerate_launch_recorded(monkeypatch, tmp_path):
    """`accelerate launch` in this process, recording the processes it would start instead of starting them.

    Runs in tmp_path (configs/ linked in, so that the relative config paths resolve and anything accelerate writes stays
    there) with no ACCELERATE_* variables of ours; os.environ is restored afterwards (accelerate patches it)."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_", "FOPE_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    saved = dict(os.environ)
    monkeypatch.setattr(accelerate_launch_utils, "is_port_in_use", lambda port: False)
    started: list[dict] = []

    def torchrun_run(args):  # what accelerate's multi-GPU and DeepSpeed launchers hand torchrun, with their environment
        config, command, command_args = torchrun.config_from_args(args)
        started.append({"by": "torchrun", "config": config, "command": [command, *command_args], "env": dict(os.environ)})

    def run_subprocess(command, env, quiet):  # the one-process launcher, and DeepSpeed's own multi-node launcher
        started.append({"by": "subprocess", "command": list(command), "env": dict(env)})

    monkeypatch.setattr(torchrun, "run", torchrun_run)
    monkeypatch.setattr(accelerate_launch, "_run_subprocess", run_subprocess)

    def launch(argv: list[str]) -> dict:
        assert argv[:2] == ["-m", "accelerate.commands.launch"], argv
        args = accelerate_launch.launch_command_parser().parse_args(argv[2:])
        try:
            accelerate_launch.launch_command(args)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        assert len(started) == 1, started
        return started.pop()

    return launch


def engine_of(started: dict) -> str:
    """The engine the started processes run, read the way the trainer reads it (fope_lm.training.distributed)."""
    env = started["env"]
    if started["by"] == "subprocess":
        if Path(started["command"][0]).name == "deepspeed":
            return "DeepSpeed over pdsh/ssh"  # DeepSpeed's multi-node default: every node would start the whole job
        return "one process"
    if env.get("ACCELERATE_USE_FSDP") == "true":
        return f"FSDP{env.get('FSDP_VERSION', '1')}"
    launcher_env = {k: env[k] for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE") if k in env}
    with patch_environment(**launcher_env):  # os.environ has neither here (accelerate_launch_recorded removes them)
        json_path = deepspeed_config_path(None)  # what train.py does with the launcher's environment
    if json_path is None:
        return "DDP"
    return f"DeepSpeed ZeRO-{json.loads(json_path.read_text())['zero_optimization']['stage']}"


@pytest.mark.parametrize("nodes,processes,node", ALLOCATIONS, ids=lambda v: str(v))
@pytest.mark.parametrize("config", sorted(ENGINES))
def test_launch_node_resolves_the_engine_its_config_names(tmp_path, accelerate_launch_recorded, config, nodes, processes, node):
    script, argv = run_launch_node(tmp_path, config, nodes, processes, node)
    if config in ONE_PROCESS and processes > 1:
        # accelerate would start one unconnected process per node: refused before anything starts
        assert script.returncode == 2, script.stdout + script.stderr
        assert "distributed_type NO" in script.stderr and f"allocation has {processes}" in script.stderr
        assert argv == []
        return
    assert script.returncode == 0, script.stdout + script.stderr
    options = {a for a in argv[2 : argv.index("train.py")] if a.startswith("--")}
    assert options <= ALLOCATION_OPTIONS, options - ALLOCATION_OPTIONS  # no --multi_gpu / --use_deepspeed / --cpu
    assert argv[argv.index("train.py") :] == ["train.py", *OVERRIDES]

    started = accelerate_launch_recorded(argv)
    assert engine_of(started) == ENGINES[config]
    env = started["env"]
    if ENGINES[config].startswith("DeepSpeed"):
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == f"configs/deepspeed/{config}.json"
    else:
        assert "ACCELERATE_USE_DEEPSPEED" not in env and "ACCELERATE_DEEPSPEED_CONFIG_FILE" not in env
    assert "ACCELERATE_USE_FSDP" not in env

    if ENGINES[config] == "one process":
        assert started["command"][-len(OVERRIDES) - 1 :] == ["train.py", *OVERRIDES]
        return
    # torchrun on this node: its share of the processes, meeting the other nodes at the allocation's first node
    launch, command = started["config"], started["command"]
    assert (launch.min_nodes, launch.max_nodes, launch.nproc_per_node) == (nodes, nodes, processes // nodes)
    assert command[-len(OVERRIDES) - 1 :] == ["train.py", *OVERRIDES]
    if nodes > 1:
        assert (launch.rdzv_backend, launch.rdzv_endpoint) == ("c10d", f"{MASTER_ADDR}:{MASTER_PORT}")
    else:  # one node: static rendezvous on this host, at the job's port
        assert (launch.rdzv_backend, launch.rdzv_endpoint) == ("static", f"127.0.0.1:{MASTER_PORT}")
        assert launch.rdzv_configs["rank"] == 0


def test_missing_accelerate_config_is_one_line_error(tmp_path):
    script, argv = run_launch_node(tmp_path, "no_such_config", 1, 8, 0)
    assert script.returncode == 2 and "no accelerate config configs/accelerate/no_such_config.yaml" in script.stderr
    assert argv == []


@pytest.mark.parametrize("config", ["zero2", "multi_gpu"])
@pytest.mark.parametrize("flag", ["--multi_gpu", "--use_deepspeed"])
def test_an_engine_flag_overrides_the_config(config, flag):
    """Why launch_node.sh passes no engine flag: accelerate reads distributed_type from the config only when no such flag
    is given. The launcher used to add --multi_gpu, and the DeepSpeed configs ran as plain DDP."""
    argv = ["--config_file", str(REPO / f"configs/accelerate/{config}.yaml"), "--num_processes", "8", flag, "train.py"]
    args, _, _ = accelerate_launch._validate_launch_command(accelerate_launch.launch_command_parser().parse_args(argv))
    assert (args.use_deepspeed, args.multi_gpu) == ((False, True) if flag == "--multi_gpu" else (True, False))
