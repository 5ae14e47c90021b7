#!/usr/bin/env bash
# The GPU benchmark in one go, about 3 minutes on one H100:
#   bash bench/gpu_check.sh [OUT_DIR]          (default bench-gpu/; PYTHON=python3, BATCH=1024, STEPS=30)
# 1. sanity: S-SGD steps on CUDA through an NCCL process group with bf16 autocast, and fp16 with
#    GradScaler; the noise step (perturb, mirror, restore, both noise.restore modes) run under
#    torch.cuda.set_sync_debug_mode("error"), i.e. with no host sync; the host syncs of a whole step counted.
# 2. `ssgd-dist train` under torchrun (NCCL, bf16), 20 steps on synthetic data.
# 3. `ssgd-dist bench`: resnet20, bf16, global batch 1024 on one GPU, with the projection; JSON and table.
# 4. halves and sgd-ga2 again, each step timed alone from an idle GPU (--burst 1): what launch latency adds.
# 5. bench/trainer_readback.py: `ssgd-dist train` with train.log_every=1 vs 10 (a host sync every step or not).
# Targets (issue 7): ssgd-halves <= 1.02 x sgd-ga2 and <= 1.05 x sgd; noise_fraction <= 0.01.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench-gpu}}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
RUN_DIR=$(mktemp -d)
trap 'rm -rf "$RUN_DIR"' EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt" || true

echo "== 1. sanity: NCCL, bf16, fp16, no host sync in the noise step"
timeout 180 "$PY" - <<'EOF' 2>&1 | tee "$OUT/sanity.txt"
import math, socket, traceback, warnings
from pathlib import Path
import torch, torch.distributed as dist
from ssgd_dist.backends.ddp import DDPBackend
from ssgd_dist.config import Config
from ssgd_dist.methods import build_method
from ssgd_dist.models import CifarResNet
from ssgd_dist.noise import Perturber, select_targets

assert torch.cuda.is_available(), "no CUDA device"
dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=dev)
print("torch", torch.__version__, "on", torch.cuda.get_device_name(dev), "backend", dist.get_backend())
x = torch.randn(512, 3, 32, 32, device=dev); y = torch.randint(0, 10, (512,), device=dev)
for precision in ("bf16", "fp16"):
    torch.manual_seed(0)
    model = CifarResNet(20, 10).to(dev)
    backend = DDPBackend(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), precision=precision,
                         clip_grad_norm=5.0, on_nonfinite="skip")
    method = build_method(Config(method="ssgd"), model, 0, 1)
    results = [backend.train_step(method, x, y, step) for step in range(30)]
    losses = [float(r.loss) for r in results]
    skipped = sum(r.skipped for r in results)
    ok = all(math.isfinite(v) for v in losses[skipped:]) and losses[-1] < losses[0]
    ok &= all(bool(torch.isfinite(p).all()) and p.dtype == torch.float32 for p in model.parameters())
    print(f"{precision}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, {skipped} skipped, finite fp32 weights: {ok}")
    assert ok, precision
    # Training's default (on_nonfinite=stop) reads nothing back under bf16; fp16's GradScaler reads its overflow flag.
    default = DDPBackend(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), precision=precision, clip_grad_norm=5.0)
    for step in range(95, 98):  # DDP syncs once while it rebuilds its buckets, on the second step
        default.train_step(method, x, y, step)
    torch.cuda.synchronize()
    sites = {}  # where each host sync comes from: the innermost frame of ours, and how often
    def record_sync(message, *args, **kwargs):
        if "synchroniz" in str(message):
            ours = [f for f in traceback.extract_stack()[:-1] if "ssgd_dist" in f.filename or "torch" in f.filename]
            site = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in ours[-3:][::-1])
            sites[site] = sites.get(site, 0) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record_sync
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in range(98, 118):
                default.train_step(method, x, y, step)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    print(f"{precision}: host syncs in 20 whole train_steps (on_nonfinite=stop): {sum(sites.values())}")
    for site, count in sites.items():
        print(f"    {count} x at {site}")
for mode in ("copy", "regenerate"):
    pert = Perturber(select_targets(model, "weights"), restore=mode)
    before = [p.detach().clone() for p in pert.params]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pert.perturb(0, 1, "rademacher", "layer_rms", 0.3)
        pert.reflect()
        pert.restore()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    drift = max(float((p - b).abs().max()) for p, b in zip(pert.params, before))
    print(f"noise step, restore={mode}: no host sync; max |w_restored - w| = {drift:.3g}")
    assert mode == "regenerate" or drift == 0.0
dist.destroy_process_group()
print("sanity: OK")
EOF

echo "== 2. train under torchrun (NCCL, bf16)"
timeout 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m ssgd_dist.cli train --config quickstart \
  --set device=cuda --set train.precision=bf16 --set data.name=synthetic --set data.batch_size=256 \
  --set optim.lr=0.1 --set train.max_steps=20 --set train.progress=false --set train.checkpoint_every=20 \
  --run-dir "$RUN_DIR" 2>&1 | tail -n 3 | tee "$OUT/train.txt"

echo "== 3. bench: resnet20, bf16, batch ${BATCH:-1024}, 1 GPU"
timeout 360 "$PY" -m ssgd_dist.cli bench --device cuda --world-size 1 --model resnet20 --precision bf16 \
  --batch-size "${BATCH:-1024}" --steps "${STEPS:-30}" --warmup 5 --project \
  --json "$OUT/bench-resnet20-bf16-b${BATCH:-1024}.json" 2>&1 | tee "$OUT/bench.txt"

echo "== 4. the same two variants timed one step at a time from an idle GPU (--burst 1), for comparison"
timeout 120 "$PY" -m ssgd_dist.cli bench --device cuda --world-size 1 --model resnet20 --precision bf16 \
  --batch-size "${BATCH:-1024}" --steps 20 --warmup 3 --burst 1 --no-memory --variants sgd-ga2,ssgd-halves \
  --json "$OUT/bench-resnet20-bf16-b${BATCH:-1024}-burst1.json" 2>&1 | tee "$OUT/bench-burst1.txt"

echo "== 5. a whole training run reading its loss back every step vs every 10 (train.log_every)"
timeout 240 "$PY" bench/trainer_readback.py --device cuda --json "$OUT/trainer-readback.json" 2>&1 | tee "$OUT/trainer-readback.txt"
