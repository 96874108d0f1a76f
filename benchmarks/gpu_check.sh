#!/usr/bin/env bash
# GPU readiness in under 8 minutes on one GPU: the `gpu` tests (NCCL + bf16, train.device=auto,
# ZeRO-3 save/consolidate/register, token-routed expert parallelism, the Triton kernels in bf16),
# then the throughput benchmark and the kernels' own benchmarks on the GPU; prints a table of
# each. Run from a fresh checkout after `make install`:
#
#     benchmarks/gpu_check.sh            # results also land in $GPU_CHECK_OUT (default: a temp dir)
#
# Environment: DS_ACCELERATOR is set to cuda here (tests/conftest.py would default it to cpu,
# and Ray's workers inherit it); MTL_DATA_DIR defaults to ../shared/data when it holds MNIST,
# else the subset in tests/fixtures/data (the benchmark then uses 512 training images).
# Without a CUDA device it exits 2 saying so, having run nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [[ ! -x $PY ]]; then
    echo "gpu_check: no .venv here; run \`make install\` first" >&2
    exit 2
fi
if ! gpus=$($PY -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)'); then
    echo "gpu_check: cannot import torch from $PY; run \`make install\`" >&2
    exit 2
fi
if [[ $gpus -lt 1 ]]; then
    echo "gpu_check: no CUDA device visible (torch.cuda.is_available() is False): nothing to check" \
        "here; run this on a machine with an NVIDIA GPU and its driver" >&2
    exit 2
fi
export DS_ACCELERATOR=cuda RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
if [[ -z ${MTL_DATA_DIR:-} ]]; then
    if [[ -d ../shared/data/MNIST/raw ]]; then MTL_DATA_DIR=$(cd ../shared/data && pwd); else
        MTL_DATA_DIR=$PWD/tests/fixtures/data; fi
    export MTL_DATA_DIR
fi
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t mtl-gpu-check-XXXX)}
mkdir -p "$OUT"
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db"
echo "gpu_check: $gpus GPU(s); results in $OUT; MTL_DATA_DIR=$MTL_DATA_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PY -c 'import torch, deepspeed; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, bf16 {torch.cuda.is_bf16_supported()}")'

status=0
start=$SECONDS
timeout 300 $PY -m pytest -q -m gpu tests/gpu tests/kernels -rs -p no:cacheprovider --durations=0 \
    --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log" || status=1
echo "gpu tests: $((SECONDS - start)) s"

# Throughput on the GPU: a GPU-sized micro-batch, bf16, short. 1 worker on 1 GPU (with auto,
# 2 workers on 1 GPU would train on the CPU); 2 when there are 2 GPUs.
max_workers=$((gpus >= 2 ? 2 : 1))
start=$SECONDS
timeout 200 $PY benchmarks/throughput.py configs/multimnist.yaml train.device=gpu \
    deepspeed.precision=bf16 train.micro_batch_size=256 train.threads_per_worker=4 \
    data.train_size=512 data.val_size=64 data.download=false data.cache_dir="$OUT/cache" \
    train.storage_path="$OUT/runs" --steps 60 --window 10 --max-workers $max_workers \
    --out "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log" || status=1
echo "throughput: $((SECONDS - start)) s"

# The Triton kernels (kernels/): GB/s against copy bandwidth, eager and torch.compile;
# TFLOP/s against a torch.matmul loop and F.grouped_mm.
start=$SECONDS
for kernel in gate_mix grouped_mlp; do
    timeout 60 $PY kernels/$kernel.py 2>&1 | tee "$OUT/kernel-$kernel.log" || status=1
done
echo "kernels: $((SECONDS - start)) s"

echo
echo "| gpu test | outcome | seconds |"
echo "|---|---|---|"
$PY - "$OUT/gpu-tests.xml" <<'PYEOF' || status=1
import sys
import xml.etree.ElementTree as ET

for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
    print(f"| {case.get('name')} | {outcome} | {float(case.get('time', 0)):.1f} |")
PYEOF
if [[ -f $OUT/throughput.json ]]; then
    echo
    echo "(\"vs plain\" compares with throughput.py's plain loop, which runs on the CPU)"
    $PY benchmarks/throughput.py --table "$OUT/throughput.json"
fi
exit $status
