#!/usr/bin/env bash
# Quickstart on a fresh Debian machine (CPU is enough): installs the Python dependencies and
# Debian's Fashion-MNIST if they are missing, distils Fashion-MNIST with DM at 10 images per
# class for a CPU-sized number of iterations, then evaluates the distilled set and 10 random real
# images per class under the same protocol (one evaluate.py run trains each row once) and prints
# both side by side.
#
#   bash scripts/quickstart.sh                 # about 7 minutes on 2 CPU cores (docs/results.md)
#   ITERATIONS=2000 NUM_EVAL=5 EPOCHS=1000 bash scripts/quickstart.sh   # closer to the paper, on a GPU
#   DRY_RUN=1 bash scripts/quickstart.sh       # print the commands (and the table of an earlier run in $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."

ITERATIONS=${ITERATIONS:-100}     # DM outer iterations (paper: 20000)
LR_IMG=${LR_IMG:-1}               # image learning rate (main_DM.py default)
NUM_EVAL=${NUM_EVAL:-2}           # networks trained per set
EPOCHS=${EPOCHS:-200}             # evaluation epochs (DM protocol: 1000)
SEED=${SEED:-0}
OUT=${OUT:-result/quickstart}
STRATEGY=color_crop_cutout_flip_scale_rotate

run() {  # a command, or (DRY_RUN=1) the command printed
  if [ -n "${DRY_RUN:-}" ]; then printf '+'; printf ' %q' "$@"; echo; else "$@"; fi
}

if [ -z "${DRY_RUN:-}" ] && ! python3 -c "import torch, torchvision, tqdm, yaml, scipy" 2>/dev/null; then
  echo "== installing Python dependencies (requirements.txt)"
  python3 -m pip install -q -r requirements.txt
fi
if [ -z "${DRY_RUN:-}" ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "== installing Debian's dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

start=$(date +%s)
echo "== distilling: DM, FashionMNIST, ipc 10, $ITERATIONS iterations, lr_img $LR_IMG"
run python3 distill.py --method DM --dataset FashionMNIST --ipc 10 --Iteration "$ITERATIONS" --lr_img "$LR_IMG" \
  --num_exp 1 --num_eval 0 --eval_it 0 --seed "$SEED" --run_dir "$OUT/dm" --dsa_strategy "$STRATEGY" --resume
syn="$OUT/dm/res_DM_FashionMNIST_ConvNet_10ipc.pt"

echo "== evaluating the distilled set and 10 random real images per class ($NUM_EVAL ConvNets each, $EPOCHS epochs, DSA)"
# The random-real row (same ipc, protocol and seeds as the set) is part of evaluate.py's table.
run python3 evaluate.py --dataset FashionMNIST --num_eval "$NUM_EVAL" --epoch_eval_train "$EPOCHS" \
  --dsa_strategy "$STRATEGY" --seed "$SEED" --syn_path "$syn" --out "$OUT/eval_dm.json"

[ -z "${DRY_RUN:-}" ] || [ -f "$OUT/eval_dm.json" ] || exit 0
python3 - "$OUT" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
out, seconds = sys.argv[1], int(sys.argv[2])
blob = json.load(open(f"{out}/eval_dm.json"))
dm = blob["ConvNet"]  # the first row: the distilled set
rnd = next(row for row in blob["comparison"]["rows"] if row["kind"] == "random")["results"]["ConvNet"]
print(f"\nFashion-MNIST, 10 images per class, ConvNet test accuracy (%), same protocol for both:")
print(f"  {'set':<28}{'mean ± std':>16}   networks")
for name, r in (("DM (distilled)", dm), ("random real images", rnd)):
    print(f"  {name:<28}{100 * r['mean']:>8.2f} ± {100 * r['std']:<5.2f}   {len(r['accs'])}")
print(f"  difference: {100 * (dm['mean'] - rnd['mean']):+.2f} points")
print(f"\npicture of the synthetic set: {out}/dm/vis_DM_FashionMNIST_ConvNet_10ipc_exp0_iter*.png")
print(f"result file (reference layout): {out}/dm/res_DM_FashionMNIST_ConvNet_10ipc.pt")
print(f"total time (distillation + evaluation): {seconds} s")
PY
