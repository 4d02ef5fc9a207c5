#!/bin/bash
# Dense2MoE stages on N SLURM nodes × 8 GPUs, one task per GPU (docs/scale.md):
#   sbatch --nodes 2 scripts/slurm_fsdp.sh experiments/flux_dev_moe_l_fsdp.yaml [--key.path value ...]
# Lightning reads ranks and the main address from SLURM's variables; the runner takes num_nodes from SLURM_NNODES.
# Adapt partition, account and time to your cluster. Resubmitting the same command resumes the run.
#SBATCH --job-name=dense2moe
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch [--nodes N] scripts/slurm_fsdp.sh EXPERIMENT.yaml [overrides ...]}
shift

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-.venv/bin/python}

export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}
# MLflow across nodes needs a server all nodes reach (a SQLite file on shared storage locks under concurrency).
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI to your tracking server, e.g. http://mlflow:5000}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

srun --kill-on-bad-exit=1 "$PYTHON" -m src.cli fit --config "$CONFIG" "$@"
