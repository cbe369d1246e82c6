#!/usr/bin/env bash
# Sweep DC (or DSA with METHOD=DSA) over datasets x ipc with the reference defaults, one run
# directory per cell, then print every cell's final accuracy. Runs that were stopped continue
# (--resume) when the sweep is started again.
#
#   bash scripts/sweep_dc.sh                                   # reference settings (GPU-sized)
#   DATASETS="FashionMNIST" IPCS="1" ITERATIONS=20 NUM_EXP=1 NUM_EVAL=2 bash scripts/sweep_dc.sh   # CPU try-out
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
EXTRA=${EXTRA:-}

for dataset in $DATASETS; do
  for ipc in $IPCS; do
    echo "== $METHOD $dataset ipc $ipc"
    python3 distill.py --method "$METHOD" --dataset "$dataset" --ipc "$ipc" --Iteration "$ITERATIONS" \
      --num_exp "$NUM_EXP" --num_eval "$NUM_EVAL" --data_path "$DATA_PATH" --save_path "$SAVE_PATH" \
      --eval_it 0 --resume $EXTRA || echo "!! $METHOD $dataset ipc $ipc failed (exit $?)"
  done
done

echo; echo "== results ($SAVE_PATH)"
for f in "$SAVE_PATH"/*/results.json; do
  [ -f "$f" ] && python3 -c "import json,sys; r=json.load(open(sys.argv[1])); a=r['accuracy']['ConvNet'] if 'ConvNet' in r['accuracy'] else next(iter(r['accuracy'].values())); print(f\"{r['method']:<5} {r['dataset']:<14} ipc {r['ipc']:<4} {100*a['mean']:6.2f} ± {100*a['std']:.2f}\")" "$f"
done
