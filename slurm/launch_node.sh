#!/usr/bin/env bash
# One SLURM task per node runs this: `accelerate launch` for the node's GPUs, rendezvous on the first node.
# Called by slurm/train.sbatch through srun; reads the allocation from SLURM_* and the FOPE_* variables
# train.sbatch exports. Arguments: Hydra overrides for train.py.
#
# The engine is the accelerate config's distributed_type (MULTI_GPU: DDP; DEEPSPEED: ZeRO, from the JSON it names;
# NO: one process); this script passes only what the allocation decides. It passes no --multi_gpu/--use_deepspeed:
# accelerate takes the engine from the config only when no such flag is given (tests/test_launch.py checks every config).
set -euo pipefail
config=$FOPE_ACCELERATE_CONFIG
[[ -f "$config" ]] || { echo "launch_node.sh: no accelerate config $config" >&2; exit 2; }
engine=$(awk '$1 == "distributed_type:" {print $2}' "$config" | tr -d "\"'")
if [[ "$engine" == NO && "$FOPE_NUM_PROCESSES" -gt 1 ]]; then
  # accelerate would start one unconnected process per node
  echo "launch_node.sh: $config runs one process (distributed_type NO) but the allocation has $FOPE_NUM_PROCESSES:" \
    "use configs/accelerate/multi_gpu.yaml (DDP) or zero{1,2,3}.yaml (DeepSpeed)" >&2
  exit 2
fi

args=(
  --config_file "$config"
  --num_machines "$FOPE_NUM_MACHINES"
  --num_processes "$FOPE_NUM_PROCESSES"
  --machine_rank "${SLURM_NODEID:-0}"
  --main_process_ip "$FOPE_MASTER_ADDR"
  --main_process_port "$FOPE_MASTER_PORT"
)
if [[ "$FOPE_NUM_MACHINES" -gt 1 ]]; then
  # Nodes meet at main_process_ip:port through torchrun's c10d rendezvous. (On one node the default static rendezvous
  # is the one that uses main_process_port; c10d there would ignore it and meet at localhost:29400.)
  args+=(--rdzv_backend c10d)
  # This script is already one launcher per node: DeepSpeed's "standard" (torchrun) multi-node launcher, not its
  # default pdsh, which would start the whole job over ssh from every node. Other engines ignore it.
  args+=(--deepspeed_multinode_launcher standard)
fi
echo "node ${SLURM_NODEID:-0}: ${engine:-?} from $config: accelerate launch ${args[*]} train.py $*"
exec python -m accelerate.commands.launch "${args[@]}" train.py "$@"
