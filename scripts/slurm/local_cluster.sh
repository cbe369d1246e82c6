#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests and demos of the batch scripts
# (scripts/sweep.py --scheduler slurm, scripts/slurm/*.sbatch): munged, slurmctld and slurmd run
# with a generated munge key and slurm.conf in a directory of their own, without systemd.
#
#   bash scripts/slurm/local_cluster.sh start [DIR]    # prints the line to export: SLURM_CONF=DIR/slurm.conf
#   bash scripts/slurm/local_cluster.sh status [DIR]
#   bash scripts/slurm/local_cluster.sh stop [DIR]     # cancels its jobs, ends the daemons it started in DIR
#
# DIR defaults to $TMPDIR/dd-slurm-$UID. The node is this host (hostname -s, reached at
# 127.0.0.1, so no name lookup is needed) with the cores and memory `slurmd -C` reports.
# Partitions: `debug` (the default, no time limit) and `urgent` (the same node, a higher
# PriorityTier: its jobs preempt debug's, which are requeued; PreemptType=preempt/partition_prio,
# PreemptMode=REQUEUE, JobRequeue=1, no GraceTime). select/cons_tres (CR_CPU),
# proctrack/linuxproc and task/none (no cgroups), KillWait=60 (the seconds between a job's
# SIGTERM and its SIGKILL). The daemons run as the user who starts them (SlurmUser; root in CI);
# state, spool, logs, pid files and the munge socket are all inside DIR. Ports: SLURMCTLD_PORT
# (default 6817) and SLURMD_PORT (6818). A requeued job waits for its credentials to expire
# before it starts again: cred_expire is SLURM_CRED_EXPIRE seconds (default 20; SLURM's own
# default is 120). slurm-wlm and munge are installed with apt-get when missing and this runs as
# root.
#
# `start` is idempotent: daemons already running from DIR are kept. Every failure is one line
# on stderr (with the log to read) and exit status 1.
set -uo pipefail

ACTION=${1:-}
PATH="$PATH:/usr/sbin:/sbin"  # slurmctld, slurmd, munged
DIR=${2:-${TMPDIR:-/tmp}/dd-slurm-$(id -u)}
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-20}
NODE=$(hostname -s)
CONF="$DIR/slurm.conf"
SOCKET="$DIR/munge/munge.socket"

fail() {  # one line; a failed start leaves nothing of its own running
  echo "local_cluster: error: $*" >&2
  [ "$ACTION" = start ] && stop_daemons > /dev/null 2>&1
  exit 1
}

usage() { echo "usage: $0 start|stop|status [DIR]" >&2; exit 2; }

# pid recorded for daemon $1 (munged, slurmctld, slurmd), if that process still runs that daemon.
running_pid() {
  local file="$DIR/run/$1.pid" pid
  [ -f "$file" ] || return 1
  pid=$(cat "$file" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ -r "/proc/$pid/cmdline" ] || return 1
  # The same daemon, started on this directory (a reused pid is never taken for ours).
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$1" || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$DIR" || return 1
  echo "$pid"
}

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sbatch >/dev/null; then
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    fail "SLURM or munge is not installed; as root run: apt-get install -y slurm-wlm munge (or run this script as root)"
  fi
  echo "local_cluster: installing slurm-wlm and munge (apt-get)" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } \
    > "$DIR/log/apt.log" 2>&1 || fail "apt-get install slurm-wlm munge failed; see $DIR/log/apt.log"
  for tool in slurmctld slurmd munged sbatch; do
    command -v "$tool" >/dev/null || fail "$tool is still missing after apt-get install slurm-wlm munge"
  done
}

write_config() {
  local probe cpus mem sockets cores threads
  probe=$(slurmd -C 2>/dev/null | head -n 1)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<< "$probe")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<< "$probe")
  sockets=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<< "$probe")
  cores=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<< "$probe")
  threads=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<< "$probe")
  [ -n "$cpus" ] || cpus=$(nproc)
  [ -n "$mem" ] || mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
  local topology=""
  [ -n "$sockets" ] && [ -n "$cores" ] && [ -n "$threads" ] \
    && topology=" Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads"
  cat > "$CONF.tmp" <<EOF
# Written by scripts/slurm/local_cluster.sh: a one-node cluster on $NODE, everything under $DIR.
ClusterName=ddlocal
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$SOCKET,cred_expire=$CRED_EXPIRE
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
KillWait=60
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem$topology State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE OverSubscribe=NO
PartitionName=urgent Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=2 OverSubscribe=NO
EOF
  mv "$CONF.tmp" "$CONF"
}

start_munge() {
  if running_pid munged >/dev/null; then return 0; fi
  if [ ! -s "$DIR/munge/munge.key" ]; then
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$DIR/munge/munge.key" --force >/dev/null 2>&1
    fi
    [ -s "$DIR/munge/munge.key" ] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$DIR/munge/munge.key"
  fi
  rm -f "$SOCKET" "$SOCKET.lock"
  munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" >> "$DIR/log/munged.log" 2>&1 \
    || fail "munged did not start; see $DIR/log/munged.log"
  for _ in $(seq 50); do [ -S "$SOCKET" ] && running_pid munged >/dev/null && return 0; sleep 0.1; done
  fail "munged did not open its socket $SOCKET; see $DIR/log/munged.log"
}

start_daemon() {  # $1: slurmctld or slurmd
  if running_pid "$1" >/dev/null; then return 0; fi
  local extra=()
  [ "$1" = slurmd ] && extra=(-N "$NODE")
  SLURM_CONF="$CONF" "$1" -f "$CONF" "${extra[@]}" >> "$DIR/log/$1.out" 2>&1 \
    || fail "$1 did not start; see $DIR/log/$1.log and $DIR/log/$1.out"
  for _ in $(seq 100); do running_pid "$1" >/dev/null && return 0; sleep 0.1; done
  fail "$1 exited at start; see $DIR/log/$1.log and $DIR/log/$1.out"
}

node_state() {
  SLURM_CONF="$CONF" sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n 1
}

do_start() {
  mkdir -p "$DIR"/{run,log,state,spool,munge} 2>/dev/null || fail "cannot create the directories of $DIR"
  chmod 700 "$DIR/munge"
  install_if_missing
  if ! running_pid slurmctld >/dev/null || [ ! -f "$CONF" ]; then
    write_config
  fi
  start_munge
  start_daemon slurmctld
  start_daemon slurmd
  local state=""
  for _ in $(seq 120); do
    state=$(node_state)
    case "$state" in
      idle|mix|alloc) break ;;
    esac
    sleep 0.5
  done
  case "$state" in
    idle|mix|alloc) ;;
    *) fail "node $NODE is '${state:-not reported}' after 60 s, not idle; see $DIR/log/slurmctld.log and $DIR/log/slurmd.log" ;;
  esac
  echo "local_cluster: running in $DIR (node $NODE $state)" >&2
  echo "export SLURM_CONF=$CONF"
}

do_stop() {
  local jobs
  if running_pid slurmctld >/dev/null && running_pid slurmd >/dev/null; then
    # Jobs still in the cluster end first (SIGTERM, SIGKILL after KillWait), so that no job step
    # outlives the daemons.
    jobs=$(SLURM_CONF="$CONF" squeue -h -o %A 2>/dev/null | sort -u)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086  # job ids, split on purpose
      SLURM_CONF="$CONF" scancel $jobs 2>/dev/null
      for _ in $(seq 150); do
        [ -z "$(SLURM_CONF="$CONF" squeue -h -o %A 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
  fi
  stop_daemons
}

stop_daemons() {  # the daemons recorded in DIR/run, if they still run
  local daemon pid stopped=0
  for daemon in slurmd slurmctld munged; do
    pid=$(running_pid "$daemon") || continue
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
    stopped=$((stopped + 1))
  done
  echo "local_cluster: stopped $stopped daemon(s) started in $DIR" >&2
}

do_status() {
  local daemon pid down=0
  for daemon in munged slurmctld slurmd; do
    if pid=$(running_pid "$daemon"); then
      echo "$daemon: running (pid $pid)"
    else
      echo "$daemon: not running"; down=1
    fi
  done
  if [ "$down" = 0 ]; then
    echo "node $NODE: $(node_state)"
    echo "export SLURM_CONF=$CONF"
  fi
  return "$down"
}

case "$ACTION" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) usage ;;
esac
