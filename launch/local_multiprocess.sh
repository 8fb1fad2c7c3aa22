#!/usr/bin/env bash
# Simulates N hosts on one machine (CPU, gloo collectives): each process is one "host".
# Usage: launch/local_multiprocess.sh N configs/vq_tiny.py WORKDIR [overrides...]
set -euo pipefail
n=$1; config=$2; workdir=$3; shift 3
port=${PORT:-12355}
for ((i = 0; i < n; i++)); do
  python -m dim_jax.launch_multihost --coordinator "127.0.0.1:$port" --num_processes "$n" \
    --process_id "$i" --config "$config" --workdir "$workdir" "$@" &
done
wait
