#!/usr/bin/env bash
# Multi-host launch on SLURM: one process per task; jax.distributed.initialize() reads the
# SLURM environment (coordinator = first node of the step, port from the job id, process
# id = SLURM_PROCID, each process drives local device SLURM_LOCALID).
#
#   sbatch --nodes=N [--ntasks-per-node=G --gpus-per-node=G] \
#       launch/slurm_multihost.sh configs/vq.py:role=listener WORKDIR [overrides...]
#   srun -n 2 launch/slurm_multihost.sh configs/vq_tiny.py WORKDIR [overrides...]  # one node
#
# As a batch script (sbatch) it starts `srun` with the allocation's tasks (sbatch's default:
# one per node; one process per GPU takes --ntasks-per-node=G); run as a task of a step
# (srun, salloc + srun) it is that task's process. PYTHON names the interpreter (default:
# python on PATH, e.g. a venv's bin/python). Run from the repository root, which all nodes
# see at the same path (configs/ paths are relative).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
config=$1; workdir=$2; shift 2
cmd=("${PYTHON:-python}" -m dim_jax.launch_multihost --config "$config" --workdir "$workdir" "$@")
if [[ -n ${SLURM_STEP_ID:-} ]]; then
  exec "${cmd[@]}"  # one task of a step
fi
# The batch script: launch every task; one failing task ends the others (no hung collectives).
exec srun --kill-on-bad-exit=1 "${cmd[@]}"
