#!/usr/bin/env bash
# Launch ssgd-dist training with torchrun on this node.
#   NPROC=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=head MASTER_PORT=29500 launch/torchrun.sh --config X [--set k=v ...]
# Single node defaults: all local GPUs (or 2 CPU processes), standalone rendezvous.
set -euo pipefail
if command -v nvidia-smi >/dev/null 2>&1; then default_nproc=$(nvidia-smi -L | wc -l); else default_nproc=2; fi
NPROC=${NPROC:-$default_nproc}
NNODES=${NNODES:-1}
if [ "$NNODES" -eq 1 ]; then
  exec torchrun --standalone --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}" -m ssgd_dist.cli train "$@"
fi
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --node_rank="${NODE_RANK:?set NODE_RANK}" \
  --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" --master_port="${MASTER_PORT:-29500}" \
  --max-restarts="${MAX_RESTARTS:-0}" -m ssgd_dist.cli train "$@"
