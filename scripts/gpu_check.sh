#!/usr/bin/env bash
# Short check of the CUDA path (under 8 minutes on one GPU): every method a few iterations in fp32
# and with --amp bf16, evaluation of 20 networks (--stacked_eval on/off when evaluate.py has it),
# a small buffer and a small original model, each beside a CPU run of the same tiny problem; one
# table on stdout, JSON in $OUT/gpu_check.json when OUT is set. Fashion-MNIST is read from beside
# this script or --data_path DIR (or /usr/share/datasets/fashion-mnist); nothing is downloaded.
#   bash scripts/gpu_check.sh                       # on a CUDA machine
#   DEVICE=cpu bash scripts/gpu_check.sh            # dry run (CPU, generated miniature data)
#   bash scripts/gpu_check.sh --data_path /data --amp fp16 --cases DC DM eval
set -euo pipefail
# The toolkit is imported as installed (pip install -e . in the checkout, as .ci/run does).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
args=("$@")
if [ "${DEVICE:-cuda}" = cpu ]; then
    args+=(--dry)
fi
exec timeout "${GPU_CHECK_TIMEOUT:-480}" python3 "$HERE/gpu_check.py" "${args[@]}"
