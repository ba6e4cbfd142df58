#!/usr/bin/env bash
# One SLURM task per node runs this: `accelerate launch` for the node's GPUs, rendezvous on the first node.
# Called by slurm/train.sbatch through srun; reads the allocation from SLURM_* and the FOPE_* variables
# train.sbatch exports. Arguments: Hydra overrides for train.py.
set -euo pipefail
args=(
  --config_file "$FOPE_ACCELERATE_CONFIG"
  --num_machines "$FOPE_NUM_MACHINES"
  --num_processes "$FOPE_NUM_PROCESSES"
  --machine_rank "${SLURM_NODEID:-0}"
  --main_process_ip "$FOPE_MASTER_ADDR"
  --main_process_port "$FOPE_MASTER_PORT"
  --rdzv_backend c10d
)
if [[ "$FOPE_NUM_PROCESSES" -gt "$FOPE_NUM_MACHINES" ]]; then
  args+=(--multi_gpu)
fi
echo "node ${SLURM_NODEID:-0}: accelerate launch ${args[*]} train.py $*"
exec python -m accelerate.commands.launch "${args[@]}" train.py "$@"
