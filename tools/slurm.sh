#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests of `tools/reproduce.py --slurm` and for trying it.
#
#   sudo bash tools/slurm.sh start     # install (Debian: slurm-wlm, munge) if needed, configure, start, check
#   bash tools/slurm.sh status         # exit 0 when `srun hostname` runs
#   sudo bash tools/slurm.sh stop
#
# One node (this machine, all its CPUs), one partition `dksgraph` (the default), no accounting;
# ProctrackType=proctrack/linuxproc and TaskPlugin=task/none, which need no cgroups or systemd, so it
# runs in containers. `start` ends with `srun hostname`; it exits non-zero with the reason on the last
# line of its output when SLURM cannot be started here (not root, no package manager, a daemon that
# does not come up). Daemon logs: /var/log/slurm/. It is a developer's and CI's cluster, not a
# production one: root runs the daemons and the jobs' users are not separated.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
LOGS=/var/log/slurm
PARTITION=dksgraph

fail() { echo "slurm.sh: cannot start SLURM here: $*" >&2; exit 3; }

running() { timeout 20 srun --quiet -N1 -n1 -t 1 hostname >/dev/null 2>&1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    [ "$(id -u)" = 0 ] || fail "slurm-wlm and munge are not installed and this is not root (run with sudo)"
    command -v apt-get >/dev/null || fail "no apt-get to install slurm-wlm and munge (install them, then rerun)"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
        || fail "apt-get install slurm-wlm munge failed"
}

configure() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc --all)
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p /etc/slurm "$LOGS" /var/spool/slurmctld /var/spool/slurmd /run/munge /var/log/munge
    cat > "$CONF" <<EOF
# written by dksgraph's tools/slurm.sh: a one-node cluster for tests
ClusterName=dksgraph
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=10
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    chown -R munge:munge /run/munge /var/log/munge 2>/dev/null || true
    [ -s /etc/munge/munge.key ] || mungekey --create --force >/dev/null 2>&1 || fail "could not create a munge key"
}

start() {
    [ "$(id -u)" = 0 ] || fail "starting the daemons needs root (run with sudo)"
    install_packages
    if running; then echo "SLURM already runs: $(srun -N1 -n1 hostname)"; return 0; fi
    configure
    pgrep -x munged >/dev/null || su -s /bin/sh munge -c "munged" 2>/dev/null || munged --force \
        || fail "munged did not start (see /var/log/munge/munged.log)"
    pkill -x slurmctld 2>/dev/null || true
    pkill -x slurmd 2>/dev/null || true
    sleep 1
    slurmctld -c || fail "slurmctld did not start (see $LOGS/slurmctld.log)"
    slurmd -c || fail "slurmd did not start (see $LOGS/slurmd.log)"
    for _ in $(seq 60); do
        if running; then
            scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
            echo "SLURM runs: partition $PARTITION, node $(hostname -s) with $(nproc --all) CPUs; srun hostname: $(srun -N1 -n1 hostname)"
            return 0
        fi
        sleep 1
    done
    tail -n 5 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
    fail "the daemons started but \`srun hostname\` did not run within 60 s (logs above)"
}

stop() {
    scontrol shutdown >/dev/null 2>&1 || true
    sleep 1
    pkill -x slurmctld 2>/dev/null || true
    pkill -x slurmd 2>/dev/null || true
    echo "SLURM stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) if running; then echo "SLURM runs: $(sinfo -h -o '%P %D nodes %c CPUs %t')"; else echo "SLURM is not running"; exit 1; fi ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
