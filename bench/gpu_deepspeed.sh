#!/usr/bin/env bash
# DeepSpeed on a GPU: `ssgd-dist train` with backend=deepspeed under torchrun (NCCL), S-SGD `halves`,
# ZeRO 0 in fp32 and ZeRO 1 and 2 in bf16, 40 steps each of the quickstart MLP on synthetic data.
#   bash bench/gpu_deepspeed.sh [NPROC]        (PYTHON=python3; default NPROC: every visible GPU)
# Each run must finish (exit 0) with a finite, lower loss; prints the first and last logged losses.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NPROC=${1:-$("$PY" -c "import torch; print(torch.cuda.device_count())")}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for run in "0 false" "1 true" "2 true"; do
  set -- $run
  dir=$(mktemp -d)
  timeout 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m ssgd_dist.cli train \
    --config quickstart --set device=cuda --set backend=deepspeed --set deepspeed.zero_stage="$1" \
    --set deepspeed.bf16="$2" --set data.name=synthetic --set data.batch_size=512 --set optim.lr=0.1 \
    --set train.max_steps=40 --set train.progress=false --set train.checkpoint_every=20 --run-dir "$dir" 2>&1 | tail -n 1
  "$PY" - "$dir" "$1" "$2" <<'PYEOF'
import json, math, sys
records = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
first, last = records[0]["train_loss"], records[-1]["train_loss"]
ok = len(records) == 40 and math.isfinite(last) and last < first
print(f"ZeRO {sys.argv[2]}, bf16 {sys.argv[3]}: {len(records)} steps, loss {first:.5f} -> {last:.5f}: {'OK' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PYEOF
  rm -rf "$dir"
done
