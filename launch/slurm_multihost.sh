#!/usr/bin/env bash
# Multi-host launch on SLURM: one process per node; jax.distributed.initialize() reads the
# SLURM environment. Usage: sbatch --nodes=N launch/slurm_multihost.sh configs/vq.py:role=listener WORKDIR [overrides...]
#SBATCH --ntasks-per-node=1
set -euo pipefail
config=$1; workdir=$2; shift 2
srun python -m dim_jax.launch_multihost --config "$config" --workdir "$workdir" "$@"
