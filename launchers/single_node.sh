#!/usr/bin/env bash
# One machine, all its GPUs (or N CPU processes with --num_gpus N on a machine without GPUs).
#   launchers/single_node.sh CONFIG DATA MODEL OUTPUT [extra pretrain.py args...]
# Environment: NUM_GPUS (default: all visible GPUs, or 2 on a CPU-only machine).
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: $0 CONFIG DATA MODEL OUTPUT [pretrain.py args...]" >&2; exit 2
fi
config=$1 data=$2 model=$3 output=$4; shift 4
here=$(cd "$(dirname "$0")" && pwd)
if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec deepspeed --num_gpus "$NUM_GPUS" "$here/pretrain.py" \
    --deepspeed_config "$config" --data "$data" --model "$model" --output "$output" "$@"
