#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, to try workflow/profiles/slurm before touching a
# real cluster (and for tests/test_slurm.py).  Debian/Ubuntu, as root:
#
#   workflow/profiles/slurm/local-cluster.sh start    # install slurm-wlm + munge if needed, start
#   workflow/profiles/slurm/local-cluster.sh status   # sinfo; exit 0 when the node is usable
#   workflow/profiles/slurm/local-cluster.sh stop     # stop slurmd, slurmctld and munged
#
# One node (this host, all its CPUs, 80% of its memory) in one default partition `local`, no
# accounting database.  Without accounting `sacct` fails, so run Snakemake with
#   --slurm-status-command squeue --slurm-init-seconds-before-status-checks 5
# (otherwise the executor never sees a job finish; see README.md).  Every daemon started here
# records its process id under $RUN_DIR and `stop` ends exactly those processes.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# written by archbench local-cluster.sh"
RUN_DIR=/run/archbench-slurm
STATE_DIR=/var/spool/archbench-slurm
LOG_DIR=/var/log/archbench-slurm
MUNGE_PID=/run/munge/munged.pid

die() { echo "local-cluster.sh: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and apt-get is not here"
    echo "installing slurm-wlm and munge (apt-get)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        head -c 1024 /dev/urandom >/etc/munge/munge.key
    fi
    mkdir -p /var/log/munge /run/munge /var/lib/munge
    chown munge:munge /etc/munge/munge.key /var/log/munge /run/munge /var/lib/munge
    chmod 400 /etc/munge/munge.key
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- munged --force
        # munged daemonizes and writes its pid file; record it with our own.
        for _ in $(seq 50); do [ -s "$MUNGE_PID" ] && break; sleep 0.1; done
        cp "$MUNGE_PID" "$RUN_DIR/munged.pid"
    fi
    munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge)"
}

write_config() {
    if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script: refusing to replace it"
    fi
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    mkdir -p "$(dirname "$CONF")" "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR"
    cat >"$CONF" <<EOF
$MARKER; \`local-cluster.sh stop\` leaves it in place.
ClusterName=archbench
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

# Whether the process in pid file $1 is alive (no pgrep: minimal images lack procps).
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { sinfo --noheader --format=%T 2>/dev/null | head -n1; }

start() {
    [ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts daemons)"
    mkdir -p "$RUN_DIR"
    install_packages
    start_munge
    write_config
    running "$RUN_DIR/slurmctld.pid" || slurmctld
    running "$RUN_DIR/slurmd.pid" || slurmd
    for _ in $(seq 60); do
        case "$(node_state)" in
            idle | mixed | allocated) sinfo; return 0 ;;
        esac
        sleep 0.5
    done
    die "the node did not become idle in 30 s; see $LOG_DIR"
}

stop_pid_file() {
    local file=$1 pid
    [ -s "$file" ] || return 0
    pid=$(cat "$file")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$file"
}

stop() {
    # The order matters: slurmd and slurmctld authenticate through munged while shutting down.
    stop_pid_file "$RUN_DIR/slurmd.pid"
    stop_pid_file "$RUN_DIR/slurmctld.pid"
    stop_pid_file "$RUN_DIR/munged.pid"
}

status() {
    case "$(node_state)" in
        idle | mixed | allocated) sinfo ;;
        *) echo "local-cluster.sh: no usable local SLURM node" >&2; return 1 ;;
    esac
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status" ;;
esac
