#!/usr/bin/env bash
# One grid point of a scripts/sweep.py job array: the array script sweep.py writes ends with
#   exec bash scripts/slurm/array_task.sh GRID_FILE
# and this shell, now the job's batch shell, runs line SLURM_ARRAY_TASK_ID (0-based) of GRID_FILE:
# NAME, RUN_DIR, the distill.py flags and, with sweep.py --random_baseline, the evaluate.py flags
# (tab-separated, each flag list shell-quoted). Environment it reads: SWEEP_PYTHON (python3),
# SWEEP_NPROC_PER_NODE (0: one process; N > 0: srun + torchrun with N processes per node),
# SWEEP_MAX_REQUEUES (20), SWEEP_SRUN (0; torchrun starts under srun, one task per node, when it
# is 1 or the job has several nodes; on one node torchrun runs in the batch shell's step).
#
# Stops and requeues (docs/scale-out.md, "SLURM job arrays"):
# - SIGUSR1 is the time-limit warning (sweep.py submits --signal=B:USR1@GRACE, to this shell only):
#   it is forwarded to the stage as SIGTERM (distill.py then finishes or drops its iteration,
#   writes last.pt and exits with 130); when the grid point is not finished, the array element
#   requeues itself (scontrol requeue ARRAYJOB_TASK) and its next start continues with --resume.
# - SIGTERM comes from SLURM itself to every process of the job (scontrol requeue, a preemption
#   with PreemptMode=REQUEUE, scancel, the time limit): it is forwarded too, and this shell does
#   not requeue: SLURM requeues the job when that is what it was asked (or preempted) to do, and a
#   cancelled job stays cancelled.
# Under srun (several nodes), SLURM's own SIGTERM also reaches srun, which then kills its step
# at once: the run continues from the last --checkpoint_every checkpoint (still bit-exactly), the
# iterations since are done again. The time-limit warning is passed to the step's processes with
# scancel --signal=TERM (not through srun), so they stop cleanly.
# A finished grid point (results.json, and eval.json when asked for) is not run again.
set -uo pipefail

GRID=${1:?usage: array_task.sh GRID_FILE (run by the array script of scripts/sweep.py)}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO" || exit 2
PYTHON=${SWEEP_PYTHON:-python3}
NPROC=${SWEEP_NPROC_PER_NODE:-0}
MAX_REQUEUES=${SWEEP_MAX_REQUEUES:-20}
SRUN=${SWEEP_SRUN:-0}
[ "${SLURM_NNODES:-1}" -gt 1 ] && SRUN=1
index=${SLURM_ARRAY_TASK_ID:?array_task.sh runs as a SLURM array task (sbatch --array)}
line=$(sed -n "$((index + 1))p" "$GRID")
if [ -z "$line" ]; then
  echo "sweep task: $GRID has no line for array index $index" >&2
  exit 2
fi
IFS=$'\t' read -r name run_dir distill_args evaluate_args <<< "$line"
status_dir="$(dirname "$GRID")/exit"
mkdir -p "$status_dir"
element="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
echo "sweep task $element (job $SLURM_JOB_ID, start $((${SLURM_RESTART_COUNT:-0} + 1))): $name in $run_dir"

warned=0
signals=0
child=""
forward() {
  signals=$((signals + 1))
  [ -n "$child" ] || return 0
  if [ "$SRUN" = 1 ]; then
    # srun answers a SIGTERM of its own by killing its step at once: the step's processes
    # (torchrun and its workers, on every node) get the SIGTERM from SLURM instead.
    [ "$1" = TERM ] || scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || kill -TERM "$child" 2>/dev/null
  else
    kill -TERM "$child" 2>/dev/null
  fi
}
trap 'warned=1; forward USR1' USR1
trap 'forward TERM' TERM

# Run a stage script with its flags in the background (so that the traps run at once) and wait
# for its exit status, also when a signal interrupts the wait.
launch() {
  if [ "$NPROC" -gt 0 ]; then
    local head port
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    port=$((20000 + SLURM_JOB_ID % 20000))
    local torchrun=("$PYTHON" -m torch.distributed.run --nnodes "${SLURM_NNODES:-1}" --nproc_per_node "$NPROC"
                    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head:$port")
    if [ "$SRUN" = 1 ]; then
      srun --kill-on-bad-exit=1 --ntasks-per-node=1 "${torchrun[@]}" "$@" &
    else
      "${torchrun[@]}" "$@" &
    fi
  else
    "$PYTHON" "$@" &
  fi
  child=$!
  local status before
  while true; do
    before=$signals
    wait "$child"
    status=$?
    [ "$signals" = "$before" ] && break  # the stage's own exit, not a trapped signal
  done
  child=""
  return "$status"
}

finished() {
  [ -f "$run_dir/results.json" ] && { [ -z "$evaluate_args" ] || [ -f "$run_dir/eval.json" ]; }
}

step=distill
status=0
if [ -f "$run_dir/results.json" ]; then
  echo "sweep task: $name already has results.json"
else
  eval "set -- $distill_args"
  launch distill.py "$@" --run_dir "$run_dir" --resume
  status=$?
fi
if [ "$status" = 0 ] && [ -n "$evaluate_args" ] && [ ! -f "$run_dir/eval.json" ] && [ "$warned" = 0 ]; then
  step=evaluate
  eval "set -- $evaluate_args"
  launch evaluate.py "$@" --syn_path "$run_dir" --out "$run_dir/eval.json"
  status=$?
fi
echo "$step $status" > "$status_dir/$name"

if [ "$warned" = 1 ] && ! finished; then
  if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
    echo "sweep task: stopped before the time limit ($step exit $status); requeueing $element to continue"
    scontrol requeue "$element" || echo "sweep task: scontrol requeue $element failed" >&2
  else
    echo "sweep task: stopped before the time limit; not requeued, $MAX_REQUEUES requeues already" >&2
  fi
fi
exit "$status"
