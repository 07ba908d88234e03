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

# NCCL: fail fast instead of hanging on a dead peer; leave InfiniBand on unless the fabric is broken.
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# Network interface, where the nodes have several: set NCCL_SOCKET_IFNAME (NCCL's syntax: prefixes
# "eth", an exact name "=eth0", exclusions "^docker,lo"). The CPU-side gloo groups follow
# GLOO_SOCKET_IFNAME, else the address the hostname resolves to; unless you set GLOO_SOCKET_IFNAME,
# every rank sets it at start-up to the first non-loopback interface that NCCL_SOCKET_IFNAME selects
# on its own node (dist_sparse/distributed/startup.py), and stops with a message if it selects none.

# DeepSpeed's ssh (pdsh) runner passes only NCCL_*, PYTHON*, UCX*, MV2* and MLFLOW* variables to the
# nodes, plus the lines of a .deepspeed_env file (in ~ and the current directory; DS_ENV_FILE renames
# it). Hand it one file with the other variables set above, then those files, so that theirs win.
envfile=$(mktemp)
trap 'rm -f "$envfile"' EXIT
{
    for var in TORCH_NCCL_ASYNC_ERROR_HANDLING OMP_NUM_THREADS NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME; do
        if [ -n "${!var:-}" ]; then echo "$var=${!var}"; fi
    done
    name=${DS_ENV_FILE:-.deepspeed_env}
    case $name in /*) files=("$name") ;; *) files=(~/"$name" "./$name") ;; esac
    for f in "${files[@]}"; do
        # DeepSpeed splits every line at "=": no blank lines; a missing last newline is added.
        if [ -f "$f" ]; then sed -e '$a\' "$f" | grep -v '^[[:space:]]*$' || true; fi
    done
} > "$envfile"
export DS_ENV_FILE=$envfile   # an absolute name replaces both .deepspeed_env locations
master_port=${MASTER_PORT:-29500}

deepspeed --hostfile "$hostfile" --master_port "$master_port" "$here/pretrain.py" \
    --deepspeed_config "$config" --data "$data" --model "$model" --output "$output" "$@"
