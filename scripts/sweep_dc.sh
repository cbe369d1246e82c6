#!/usr/bin/env bash
# DC (or DSA with METHOD=DSA) over datasets x ipc with the reference defaults: a thin wrapper of
# scripts/sweep.py (one run directory per grid point under SAVE_PATH, finished points skipped,
# stopped ones continued with --resume), then its table (SAVE_PATH/sweep_table.md).
#
#   bash scripts/sweep_dc.sh                                   # reference settings (GPU-sized)
#   DATASETS="FashionMNIST" IPCS="1" ITERATIONS=20 NUM_EXP=1 NUM_EVAL=2 bash scripts/sweep_dc.sh   # CPU try-out
#   SCHEDULER=slurm bash scripts/sweep_dc.sh                   # the same grid as a SLURM job array
set -euo pipefail
cd "$(dirname "$0")/.."

METHOD=${METHOD:-DC}
DATASETS=${DATASETS:-"MNIST FashionMNIST SVHN CIFAR10"}
IPCS=${IPCS:-"1 10 50"}
ITERATIONS=${ITERATIONS:-1000}
NUM_EXP=${NUM_EXP:-5}
NUM_EVAL=${NUM_EVAL:-20}
DATA_PATH=${DATA_PATH:-data}
SAVE_PATH=${SAVE_PATH:-result/sweep_${METHOD}}
SCHEDULER=${SCHEDULER:-local}
EXTRA=${EXTRA:-}

# shellcheck disable=SC2086  # the lists split on purpose
python3 scripts/sweep.py --methods "$METHOD" --datasets $DATASETS --ipcs $IPCS --root "$SAVE_PATH" \
  --scheduler "$SCHEDULER" --extra "--Iteration $ITERATIONS --num_exp $NUM_EXP --num_eval $NUM_EVAL --eval_it 0 --data_path $DATA_PATH $EXTRA" \
  || echo "!! some grid points failed (exit $?): see the table"
[ "$SCHEDULER" = slurm ] || python3 scripts/sweep.py gather "$SAVE_PATH" || true
