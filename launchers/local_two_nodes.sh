#!/usr/bin/env bash
# Two "nodes" on this machine over loopback: the multi-node path (hostfile, node ranks, a
# rendezvous on MASTER_ADDR) without a second machine. Each node is started the way a node
# of a cluster without ssh is started: `deepspeed --hostfile H --no_ssh --node_rank N`.
#   launchers/local_two_nodes.sh CONFIG DATA MODEL OUTPUT [pretrain.py args...]
# Environment: SLOTS (processes per node, default 1), MASTER_PORT (default 29517).
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: $0 CONFIG DATA MODEL OUTPUT [pretrain.py args...]" >&2; exit 2
fi
config=$1 data=$2 model=$3 output=$4; shift 4
here=$(cd "$(dirname "$0")" && pwd)
slots=${SLOTS:-1}
port=${MASTER_PORT:-29517}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf 'node0 slots=%s\nnode1 slots=%s\n' "$slots" "$slots" > "$work/hostfile"

start_node() {
    local node=$1; shift
    deepspeed --hostfile "$work/hostfile" --no_ssh --node_rank="$node" \
        --master_addr 127.0.0.1 --master_port "$port" "$here/pretrain.py" \
        --deepspeed_config "$config" --data "$data" --model "$model" --output "$output" "$@"
}
start_node 1 "$@" > "$work/node1.log" 2>&1 &
pid1=$!
rc0=0; start_node 0 "$@" || rc0=$?
rc1=0; wait "$pid1" || rc1=$?
sed 's/^/[node1] /' "$work/node1.log"
echo "node0 exit $rc0, node1 exit $rc1"
[ "$rc0" -eq 0 ] && [ "$rc1" -eq 0 ]
