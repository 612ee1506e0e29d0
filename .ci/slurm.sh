#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine for tests/test_slurm.py.
#
# Installs Debian's slurm-wlm and munge, writes /etc/slurm/slurm.conf for a node named after
# this host with its CPUs and memory, and starts munged, slurmctld and slurmd. Idempotent: an
# already answering cluster with this configuration is left running. When a daemon genuinely
# cannot start (no root, no apt, a sandbox that forbids what slurmd needs), it says why and
# exits 0: tests/test_slurm.py then skips with that reason visible in pytest -ra.
set -uo pipefail

say() { echo "[slurm.sh] $*"; }
give_up() { say "SLURM NOT STARTED: $*"; say "tests/test_slurm.py will be skipped"; exit 0; }

[ "$(id -u)" = 0 ] || give_up "not root (uid $(id -u)): cannot install packages or start daemons"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || give_up "no apt-get to install slurm-wlm and munge"
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    # no service may start during the install: this script starts the daemons itself
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    status=$?
    rm -f /usr/sbin/policy-rc.d
    [ "$status" = 0 ] || give_up "apt-get install slurm-wlm munge failed (exit $status)"
fi

node=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # leave 10% to the OS
conf_dir=/etc/slurm
mkdir -p "$conf_dir" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm

new_conf=$(cat <<EOF
# written by .ci/slurm.sh: a one-node test cluster on localhost
ClusterName=metaqsm-ci
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# no cgroups: they are not available in every container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# finished jobs' states, readable without slurmdbd
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
MinJobAge=3600
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# schedule with the CPUs and memory declared here, whatever slurmd detects
SlurmdParameters=config_overrides
# stand-in GPUs, one per CPU (null devices, see gres.conf), so that recipes requesting a GPU
# (--gres=gpu:1) are schedulable side by side; jobs see no CUDA device and metaqsm --device auto
# uses the CPU
GresTypes=gpu
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} Gres=gpu:${cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
# slurmd drops a GPU without a character device file: one null device (1,3) per stand-in GPU
mkdir -p /run/slurm/gpu
for i in $(seq 0 $((cpus - 1))); do
    [ -c "/run/slurm/gpu/null$i" ] || mknod "/run/slurm/gpu/null$i" c 1 3 \
        || give_up "mknod cannot create the stand-in GPU device /run/slurm/gpu/null$i"
done
new_gres="NodeName=${node} Name=gpu File=/run/slurm/gpu/null[0-$((cpus - 1))]"

if [ "$(cat "$conf_dir/slurm.conf" 2>/dev/null)" = "$new_conf" ] \
        && [ "$(cat "$conf_dir/gres.conf" 2>/dev/null)" = "$new_gres" ] \
        && timeout 10 scontrol ping 2>/dev/null | grep -q UP \
        && timeout 10 sinfo -h -N -o '%t' 2>/dev/null | grep -q -x -E '(idle|mix|alloc)'; then
    say "already running: $(sinfo -h -N -o '%N %t %c CPUs %m MB')"
    exit 0
fi

# (re)start from a clean state with this configuration (slurmctld -c below forgets old jobs and node states)
stop() {  # a daemon from its pid file, only if that pid is still this daemon (pids get reused)
    local pid
    pid=$(cat "/run/slurm/$1.pid" 2>/dev/null) || return 0
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || return 0
    kill "$pid"
    for _ in $(seq 20); do [ -d "/proc/$pid" ] || return 0; sleep 0.25; done
}
stop slurmd
stop slurmctld
printf '%s\n' "$new_conf" > "$conf_dir/slurm.conf"
printf '%s\n' "$new_gres" > "$conf_dir/gres.conf"

# munge: a key, its runtime dirs, and the daemon running as the munge user
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged || give_up "munged did not start (see /var/log/munge/munged.log)"
    sleep 1
    munge -n | unmunge >/dev/null 2>&1 || give_up "munge cannot encode/decode a credential"
fi

slurmctld -c || give_up "slurmctld did not start: $(tail -n 3 /var/log/slurm/slurmctld.log 2>/dev/null)"
for _ in $(seq 20); do timeout 5 scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
timeout 5 scontrol ping 2>/dev/null | grep -q UP \
    || give_up "slurmctld does not answer: $(tail -n 3 /var/log/slurm/slurmctld.log 2>/dev/null)"

slurmd || give_up "slurmd did not start: $(tail -n 3 /var/log/slurm/slurmd.log 2>/dev/null)"
for _ in $(seq 40); do
    state=$(timeout 5 sinfo -h -N -o '%t' 2>/dev/null | head -n 1)
    case "$state" in idle|mix|alloc) break ;; esac
    sleep 0.5
done
case "$state" in
    idle|mix|alloc) say "running: $(sinfo -h -N -o '%N %t %c CPUs %m MB %G')" ;;
    *) give_up "node state '${state:-none}' after slurmd started: $(tail -n 3 /var/log/slurm/slurmd.log 2>/dev/null)" ;;
esac
