#!/usr/bin/env bash
# The CPU-sized Fashion-MNIST table of README.md: DC and DSA at ipc 1 and DM at ipc 10, each
# evaluated next to ipc random real images per class under the same protocol, printed as a
# Markdown table. Every cell is one distill.py run (evaluation included) plus one evaluate.py
# baseline run. Budgets are CPU-sized; override them with the variables below.
#
#   bash scripts/fmnist_cpu_table.sh            # about 35 minutes on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-result/fmnist_cpu}
NUM_EVAL=${NUM_EVAL:-3}
DC_ITERS=${DC_ITERS:-50}
DM_ITERS=${DM_ITERS:-100}
SEED=${SEED:-0}
DSA=color_crop_cutout_flip_scale_rotate
mkdir -p "$OUT"

cell() {  # name method ipc epochs strategy iterations extra-flags...
  local name=$1 method=$2 ipc=$3 epochs=$4 strategy=$5 iters=$6; shift 6
  local run="$OUT/$name"
  if [ ! -f "$run/results.json" ]; then
    python3 distill.py --method "$method" --dataset FashionMNIST --ipc "$ipc" --Iteration "$iters" \
      --num_exp 1 --num_eval "$NUM_EVAL" --epoch_eval_train "$epochs" --eval_it 0 --seed "$SEED" \
      --run_dir "$run" --resume "$@"
  fi
  if [ ! -f "$run/random.json" ]; then
    python3 evaluate.py --dataset FashionMNIST --baseline random --ipc "$ipc" --num_eval "$NUM_EVAL" \
      --epoch_eval_train "$epochs" --dsa_strategy "$strategy" --seed "$SEED" --out "$run/random.json"
  fi
}

cell dc_ipc1  DC  1  300  none  "$DC_ITERS" --init real
cell dsa_ipc1 DSA 1  1000 "$DSA" "$DC_ITERS" --init real
cell dm_ipc10 DM  10 300  "$DSA" "$DM_ITERS"

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
print("| method | ipc | iterations | eval epochs, augmentation | distilled (%) | random real (%) | s / iteration |")
print("|---|---|---|---|---|---|---|")
for name in ("dc_ipc1", "dsa_ipc1", "dm_ipc10"):
    res = json.load(open(os.path.join(out, name, "results.json")))
    rnd = json.load(open(os.path.join(out, name, "random.json")))["ConvNet"]
    acc = res["accuracy"]["ConvNet"]
    proto = res["protocol"]["ConvNet"]
    print(f"| {res['method']} | {res['ipc']} | {res['iterations']} | {proto['epochs']}, {proto['augmentation']} | "
          f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} | {100 * rnd['mean']:.2f} ± {100 * rnd['std']:.2f} | "
          f"{res['seconds_per_iteration']:.2f} |")
PY
