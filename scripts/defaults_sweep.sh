#!/usr/bin/env bash
# The defaults sweep of docs/results.md: every distillation method with its defaults (only the
# dataset, ipc and a CPU-sized --Iteration given, plus the files a method cannot run without: a
# teacher, a model pool, expert trajectories) on Fashion-MNIST, then each set evaluated with
# evaluate.py under the protocol recorded with it, beside ipc random real images per class under
# that same protocol. A table of every row: python3 scripts/defaults_table.py $OUT.
#
#   bash scripts/defaults_sweep.sh                    # docs/results.md's table: every method but NCFM, ipc 1
#   bash scripts/defaults_sweep.sh long               # its longer DD (3000) and RaT-BPTT (200) rows
#   METHODS="DC DM FRePo" bash scripts/defaults_sweep.sh
#   ITERS="DD:3000 RaT-BPTT:200" bash scripts/defaults_sweep.sh   # other --Iteration budgets
#   DRY_RUN=1 bash scripts/defaults_sweep.sh          # print the commands not run yet, run nothing
#   TINY=1 DATA_PATH=DIR OUT=DIR bash scripts/defaults_sweep.sh   # every step on tiny settings (1 iteration,
#                                                     # 1 epoch, 1 network) on the Fashion-MNIST files in DIR
#
# The defaults are the settings docs/results.md publishes. Finished steps are skipped on a re-run (a
# run directory with results.json, an eval.json). A step that fails is written to $OUT/failed.txt
# (method, step, exit status) and the sweep goes on; the table shows it as a failed row.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

TABLE=${1:-main}
case $TABLE in
  main) ;;
  long) OUT=${OUT:-result/defaults_long} METHODS=${METHODS:-DD RaT-BPTT} ITERS=${ITERS:-DD:3000 RaT-BPTT:200} ;;
  *) echo "unknown table $TABLE (main, long)" >&2; exit 2 ;;
esac
OUT=${OUT:-result/defaults_sweep}
IPC=${IPC:-1}
NUM_EVAL=${NUM_EVAL:-2}
SEED=${SEED:-0}
THREADS=${THREADS:-2}
# NCFM is left out: its recorded student protocol (2000 epochs) takes about 13 minutes a network here.
METHODS=${METHODS:-DC DSA DM DataDAM CAFE MTT DATM PAD DD KIP FRePo RaT-BPTT SRe2L CDA RDED}
# Prerequisites, trained here when missing (CPU-sized; the references use far larger ones).
TEACHER_DIR=${TEACHER_DIR:-$OUT/teachers}   # SRe2L, CDA, RDED: a train_original.py ConvNetBN,
TEACHER_EPOCHS=${TEACHER_EPOCHS:-5}         # by soft_label_table.sh's command (5 epochs, lr x0.1 after 3)
POOL_DIR=${POOL_DIR:-$OUT/pool}             # NCFM: train_original.py ConvNets (reference: 20 of 60 epochs)
POOL=${POOL:-3}
POOL_EPOCHS=${POOL_EPOCHS:-1}
BUFFER_DIR=${BUFFER_DIR:-$OUT/buffers}      # MTT, DATM, PAD: buffer.py experts (reference: 100 of 50 epochs)
EXPERTS=${EXPERTS:-1}
EXPERT_EPOCHS=${EXPERT_EPOCHS:-3}
DATA=(); [ -z "${DATA_PATH:-}" ] || DATA=(--data_path "$DATA_PATH")
TINY_EPOCHS=()
if [ -n "${TINY:-}" ]; then  # a check that every step runs, not a measurement (1 evaluation epoch, not the protocol's)
  NUM_EVAL=1 TEACHER_EPOCHS=1 POOL=1 TINY_EPOCHS=(--epoch_eval_train 1)
fi
mkdir -p "$OUT"

iterations() {  # method: the CPU-sized --Iteration of its row (each row a few minutes on 2 cores)
  local pair
  if [ -n "${TINY:-}" ]; then  # 1 iteration (RDED: a selection, none)
    if [ "$1" = RDED ]; then echo -; else echo 1; fi
    return
  fi
  for pair in ${ITERS:-}; do  # METHOD:N pairs given in the environment win
    if [ "${pair%%:*}" = "$1" ]; then echo "${pair#*:}"; return; fi
  done
  case $1 in
    DC|DSA) echo 20 ;;
    CAFE) echo 2 ;;
    NCFM|RaT-BPTT) echo 20 ;;
    MTT|DATM|PAD) echo 50 ;;
    DM|DataDAM|FRePo|KIP) echo 100 ;;
    DD) echo 300 ;;
    SRe2L|CDA) echo 1000 ;;
    RDED) echo - ;;  # a selection: no iterations (--Iteration is refused)
    *) echo "no iteration budget for --method $1" >&2; exit 2 ;;
  esac
}

prerequisites() {  # method: sets EXTRA to the flags of the files it needs (trained here when missing)
  case $1 in
    SRe2L|CDA|RDED)
      [ -f "$TEACHER_DIR/FashionMNIST/original/ConvNetBN/summary.json" ] || run python3 train_original.py \
        --dataset FashionMNIST --model ConvNetBN --num 1 --epochs "$TEACHER_EPOCHS" \
        --lr_decay_step $(( TEACHER_EPOCHS < 2 ? 1 : TEACHER_EPOCHS * 3 / 5 )) --save_path "$TEACHER_DIR" --seed "$SEED" --threads "$THREADS" \
        "${DATA[@]}"
      EXTRA="--teacher_model ConvNetBN --teacher_dir $TEACHER_DIR" ;;
    NCFM)
      [ -f "$POOL_DIR/FashionMNIST/original/ConvNet/summary.json" ] || run python3 train_original.py \
        --dataset FashionMNIST --model ConvNet --num "$POOL" --epochs "$POOL_EPOCHS" --save_path "$POOL_DIR" \
        --seed "$SEED" --threads "$THREADS" "${DATA[@]}"
      EXTRA="--pretrain_dir $POOL_DIR --num_premodel $POOL" ;;
    MTT|DATM|PAD)
      [ -d "$BUFFER_DIR/FashionMNIST" ] || run python3 buffer.py --dataset FashionMNIST --model ConvNet \
        --num_experts "$EXPERTS" --train_epochs "$EXPERT_EPOCHS" --buffer_path "$BUFFER_DIR" \
        --seed "$SEED" --threads "$THREADS" "${DATA[@]}"
      # The experts have EXPERT_EPOCHS epochs: start epochs (reference up to 25) must leave room
      # for the expert epochs matched, so both are cut to what the experts hold.
      local start=$(( EXPERT_EPOCHS - 2 ))
      local window="--buffer_path $BUFFER_DIR --expert_epochs 2 --max_start_epoch $start"
      [ "$1" = MTT ] || window="$window --current_max_start_epoch $start"
      # TINY: at the default --lr_lr one step on a miniature can make the learned step size negative
      [ -z "${TINY:-}" ] || window="$window --lr_lr 1e-7"
      EXTRA=$window ;;
    *) EXTRA="" ;;
  esac
}

run() {  # a command, or (DRY_RUN=1) the command printed
  if [ -n "${DRY_RUN:-}" ]; then printf '+'; printf ' %q' "$@"; echo; else "$@"; fi
}

timed() {  # name command...: runs it, appends "name seconds" to $OUT/times.txt; returns its status
  local name=$1 start status=0; shift
  start=$(date +%s)
  run "$@" || status=$?
  [ -n "${DRY_RUN:-}" ] || [ "$status" -ne 0 ] || echo "$name $(( $(date +%s) - start ))" >> "$OUT/times.txt"
  return "$status"
}

failed() {  # method step status: the step is recorded in $OUT/failed.txt (read by defaults_table.py)
  echo "$1 $2 $3" >> "$OUT/failed.txt"
  echo "defaults sweep: $2 of $1 failed (exit $3); going on" >&2
}

for method in $METHODS; do
  dir="$OUT/${method}_ipc$IPC"
  iters=$(iterations "$method")
  prerequisites "$method"
  if [ ! -f "$dir/results.json" ]; then
    # shellcheck disable=SC2086  # $EXTRA: flags, split on purpose
    iteration=()
    [ "$iters" = - ] || iteration=(--Iteration "$iters")
    timed "distill_$method" python3 distill.py --method "$method" --dataset FashionMNIST --ipc "$IPC" \
      "${iteration[@]}" --num_exp 1 --num_eval 0 --seed "$SEED" --threads "$THREADS" --run_dir "$dir" \
      --resume "${DATA[@]}" $EXTRA || { failed "$method" distill $?; continue; }
  fi
  if [ ! -f "$dir/eval.json" ]; then
    # No protocol or data flag: evaluate.py replays the protocol recorded with the set, for the set and
    # the random rows, and its preprocessing (--zca, KIP's --norm_stats train).
    timed "evaluate_$method" python3 evaluate.py --dataset FashionMNIST --syn_path "$dir" --random_baseline \
      --num_eval "$NUM_EVAL" --seed "$SEED" --threads "$THREADS" --out "$dir/eval.json" "${DATA[@]}" "${TINY_EPOCHS[@]}" \
      || failed "$method" evaluate $?
  fi
done
[ -n "${DRY_RUN:-}" ] || python3 scripts/defaults_table.py "$OUT"
