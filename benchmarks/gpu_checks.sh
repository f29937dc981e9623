#!/usr/bin/env bash
# The checks that need a CUDA GPU, on a machine with one and cytofuse installed. Each step's output goes to
# the terminal and to <folder>/<step>.log (default folder: gpu-checks); each step has its own time limit.
#   tests        the tests that skip without a GPU: prediction on cuda agrees with the CPU; a bf16-mixed fit
#                learns, comes back on the CPU and is evaluated on the GPU
#   demo         `cytofuse demo` as a user runs it: train.accelerator auto trains on the GPU in bf16-mixed
#   train        training throughput, fit against the bare step on the same batches, bf16-mixed (auto):
#                small CNN at 64 px and 350 px, the paper's ResNet-50 x3 (intermediate fusion) at 350 px
#   train-fp32   the ResNet-50 row again in fp32 (32-true)
#   predict      a paper-sized stack (100 x 3 x 1364 x 1364) with ResNet-50 x3 at 350 px: fp32, bf16, and bf16
#                with one batch at a time; seconds per image end to end and against the bare forward
#   predict-tta  the same in bf16 with test-time augmentation (8 dihedral transforms), the CV's default
#
#     bash benchmarks/gpu_checks.sh [folder] [step ...]
set -uo pipefail
out=${1:-gpu-checks}
shift || true
steps=${*:-tests demo train train-fp32 predict predict-tta}
mkdir -p "$out"
demo_dir=$(mktemp -d)/demo
run() {  # run <step> <seconds> <command...>
    local name=$1 limit=$2 t=$SECONDS
    shift 2
    [[ " $steps " == *" $name "* ]] || return 0
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t)) s (limit $limit s)"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"
run tests 120 python -m pytest -q -p no:cacheprovider tests/test_predict.py tests/test_train.py -k "gpu or device"
run demo 300 cytofuse demo --out "$demo_dir"
run train 120 python benchmarks/bench_train.py --table --device cuda --threads 8 --sizes 64 350 \
    --encoders smallcnn resnet50 --table-patches 1024 --epochs 3
run train-fp32 90 python benchmarks/bench_train.py --table --device cuda --threads 8 --sizes 350 --encoders resnet50 \
    --table-patches 1024 --epochs 3 --precision 32-true
run predict 150 python benchmarks/bench_predict.py --device cuda --encoder resnet50 --fusion intermediate --size 350 \
    --reps 2 --cases fp32 bf16 "bf16, workers=0 (intra-op threads)"
run predict-tta 90 python benchmarks/bench_predict.py --device cuda --encoder resnet50 --fusion intermediate --size 350 \
    --reps 1 --tta --cases bf16
