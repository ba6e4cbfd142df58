# Environment setup for every SLURM job of this project, in one place. Edit for your cluster.
# shellcheck shell=bash
# Modules, if your cluster uses them (uncomment and adapt):
#   module load cuda/12.4 gcc/12
# The Python environment: a venv made with `make install` (or set FOPE_VENV to another one).
FOPE_VENV=${FOPE_VENV:-.venv}
if [[ -f "$FOPE_VENV/bin/activate" ]]; then
  # shellcheck disable=SC1091
  source "$FOPE_VENV/bin/activate"
fi
# Prepared token data (scripts/prepare_data.py) on a shared filesystem.
export FOPE_DATA_ROOT=${FOPE_DATA_ROOT:-data}
# Compute nodes often have no internet: read models/datasets from the local cache only.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
# wandb: online when WANDB_API_KEY is set, else offline (sync later with `wandb sync`).
export WANDB_MODE=${WANDB_MODE:-$([[ -n "${WANDB_API_KEY:-}" ]] && echo online || echo offline)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TOKENIZERS_PARALLELISM=false
