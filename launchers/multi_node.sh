#!/usr/bin/env bash
# Several machines from a hostfile (lines "hostname slots=GPUS"), started from the first one
# over passwordless ssh (DeepSpeed's pdsh runner), with the NCCL settings that usually matter.
#   launchers/multi_node.sh HOSTFILE CONFIG DATA MODEL OUTPUT [pretrain.py args...]
# DATA and OUTPUT must be on a filesystem all nodes see (checkpoints are written by every rank).
# On clusters without ssh between nodes, run on each node instead:
#   deepspeed --hostfile HOSTFILE --no_ssh --node_rank=N --master_addr=FIRST_HOST ... (see local_two_nodes.sh)
set -euo pipefail
if [ $# -lt 5 ]; then
    echo "usage: $0 HOSTFILE CONFIG DATA MODEL OUTPUT [pretrain.py args...]" >&2; exit 2
fi
hostfile=$1 config=$2 data=$3 model=$4 output=$5; shift 5
here=$(cd "$(dirname "$0")" && pwd)

# NCCL: fail fast instead of hanging on a dead peer; name the interface if the nodes have several
# (NCCL_SOCKET_IFNAME=eth0 / ib0); leave InfiniBand on unless the fabric is broken.
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# The pdsh runner forwards variables listed in ~/.deepspeed_env or the current NCCL_*/PYTHON* ones.
master_port=${MASTER_PORT:-29500}

exec deepspeed --hostfile "$hostfile" --master_port "$master_port" "$here/pretrain.py" \
    --deepspeed_config "$config" --data "$data" --model "$model" --output "$output" "$@"
