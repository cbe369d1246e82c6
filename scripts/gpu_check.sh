#!/usr/bin/env bash
# One short check of the CUDA path that fits a single short GPU allocation (docs/gpu.md): every
# method a few iterations in fp32 and with --amp bf16, 20-network evaluation stacked and
# sequential, a buffer, an original model and torchrun (NCCL), each compared with CPU reference
# values stored in scripts/gpu_reference.json. Results after each case in $OUT (or --out):
# gpu_check.json, gpu_check.txt, logs/; the last lines name each failure (exit status 1).
#   bash scripts/gpu_check.sh --data_path shared/fmnist          # on a CUDA machine, OUT set
#   DEVICE=cpu bash scripts/gpu_check.sh --out check_out         # dry run (CPU, generated miniature)
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
args=("$@")
if [ "${DEVICE:-cuda}" = cpu ]; then
    args+=(--dry)
fi
# Preflight: the Python packages the stage scripts import (a GPU machine may have torch alone);
# timm (FRePo) and scipy are needed by some cases only: those cases fail, the others run.
read -r core optional < <(python3 -c '
import importlib.util
def lacking(names):
    return ",".join(n for n in names if importlib.util.find_spec(n) is None) or "-"
print(lacking(["torch", "torchvision", "numpy", "pandas", "tabulate", "tqdm", "yaml", "PIL"]), lacking(["timm", "scipy"]))')
if [ "$optional" != - ]; then
    echo "warning: python3 lacks $optional (some cases will fail; docs/gpu.md: wheels carried beside the code)"
fi
if [ "$core" != - ]; then
    echo "FAILED setup: python3 lacks $core (requirements.txt; without a network see docs/gpu.md, wheels carried beside the code)"
    exit 1
fi
# The script keeps its own deadline (--deadline_s); this outer limit only catches a hang.
# Run as a module from the repository root, so that the toolkit is found without installing it;
# relative paths in the arguments are therefore taken from the repository root.
cd "$HERE/.."
timeout -k 10 "${GPU_CHECK_TIMEOUT:-420}" python3 -m scripts.gpu_check "${args[@]}"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || [ "$rc" -gt 128 ] || [ "$rc" -eq 70 ]; then
    # Killed mid-case: the results of the finished cases are already on disk; name the one that was running.
    python3 -m scripts.gpu_check "${args[@]}" --stopped "$rc"
fi
exit "$rc"
