#!/usr/bin/env bash
# A real single-node SLURM (slurmctld + slurmd) for trying launch/slurm_multihost.sh on one
# machine, e.g. a CI runner (tests/test_slurm.py). Needs root and Debian's slurm packages:
#
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client
#   launch/slurm_single_node.sh start DIR    # writes DIR/slurm.conf, starts both daemons and
#                                            # waits (<= 60 s) until the node is idle
#   export SLURM_CONF=DIR/slurm.conf         # every SLURM client reads this cluster's config
#   srun -n 2 launch/slurm_multihost.sh configs/vq_tiny.py runs/slurm_tiny
#   launch/slurm_single_node.sh stop DIR     # stops both daemons
#
# Everything (config, state, spool, pid and log files) lives under DIR; nothing is written to
# /etc and no munge is needed: AuthType=auth/none, CredType=cred/none,
# ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no cgroups, no binding). That is
# for a test machine only: anyone who can reach the ports can run jobs as any user.
# The node is this host (hostname -s, which must resolve) with CPUs=$(nproc), at least 2 so
# that `srun -n 2` fits; partition "debug". Environment: SLURMCTLD_PORT (default 6817) and
# SLURMD_PORT (default 6818) pick other ports, e.g. next to a site SLURM; SLURM_NODE_CPUS
# overrides the CPU count.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
mode=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
conf=$dir/slurm.conf

stop() {
  local pidfile pid
  if [[ -f $conf && -f $dir/slurmctld.pid ]]; then
    # Cancel what still runs (its tasks would outlive the daemons), then shut both down.
    SLURM_CONF=$conf scancel --user="$(id -un)" >/dev/null 2>&1 || true
    for _ in $(seq 100); do  # up to 10 s
      [[ -z $(SLURM_CONF=$conf squeue -h -o %A 2>/dev/null) ]] && break
      sleep 0.1
    done
    SLURM_CONF=$conf scontrol shutdown >/dev/null 2>&1 || true
  fi
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
    [[ -f $pidfile ]] || continue
    pid=$(cat "$pidfile")
    # Only our daemon: a stale pid file may name a reused pid.
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == slurm* ]] || { rm -f "$pidfile"; continue; }
    for _ in $(seq 100); do  # up to 10 s for `scontrol shutdown`, then SIGTERM, SIGKILL
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -TERM "$pid" 2>/dev/null && sleep 1 || true
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

case $mode in
  stop) stop; echo "slurm under $dir stopped"; exit 0 ;;
  start) ;;
  *) usage ;;
esac

[[ $(id -u) -eq 0 ]] || { echo "$0: slurmd must run as root" >&2; exit 1; }
for tool in slurmctld slurmd scontrol sinfo srun; do
  command -v "$tool" >/dev/null || {
    echo "$0: $tool not found (apt-get install slurmctld slurmd slurm-client)" >&2; exit 1; }
done
node=$(hostname -s)
getent hosts "$node" >/dev/null || { echo "$0: hostname $node does not resolve" >&2; exit 1; }
cpus=${SLURM_NODE_CPUS:-$(nproc)}
(( cpus >= 2 )) || cpus=2
stop  # a previous start in the same DIR
mkdir -p "$dir/state" "$dir/spool"
cat > "$conf" <<EOF
# Written by launch/slurm_single_node.sh: a single-node test cluster, not for production.
ClusterName=dimjax
SlurmctldHost=$node
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=$node CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF

# -c: a clean start (no jobs or nodes carried over from a previous run in DIR).
slurmctld -c -f "$conf"
slurmd -f "$conf"
export SLURM_CONF=$conf
for _ in $(seq 600); do  # up to 60 s for the node to register
  state=$(sinfo -h -n "$node" -o %t 2>/dev/null || true)
  [[ $state == idle ]] && break
  sleep 0.1
done
if [[ $state != idle ]]; then
  echo "$0: node $node not idle after 60 s (state '${state}'); logs:" >&2
  tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
  stop
  exit 1
fi
echo "slurm up: node $node, $cpus CPUs, partition debug"
echo "use it:   export SLURM_CONF=$conf"
echo "stop it:  $0 stop $dir"
