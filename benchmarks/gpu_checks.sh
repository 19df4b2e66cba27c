#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go: the GPU-marked tests, the loss-memory benchmark on the GPU
# (the 0.5B-shaped case in fp32 and bf16, and 7B shapes in bf16), a few QLoRA GRPO steps at the 0.5B
# geometry (peak memory, rollout tokens/s), then the offline demo end to end.
# Usage: bash benchmarks/gpu_checks.sh [LOG_DIR]   (each step's output goes to LOG_DIR/<step>.log too)
set -u
LOG=${1:-runs/gpu-checks}
mkdir -p "$LOG"
step() {  # step NAME TIMEOUT_S CMD...: run, keep going on failure, report the exit code
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$LOG/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}
nvidia-smi -L
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
step gpu_tests 240 python3 -m pytest -m gpu tests/gpu/test_gpu.py -q -rs -p no:cacheprovider
step loss_0.5b_fp32 120 python3 benchmarks/loss_memory.py --device cuda
step loss_0.5b_bf16 120 python3 benchmarks/loss_memory.py --device cuda --dtype bfloat16
step loss_7b_bf16 180 python3 benchmarks/loss_memory.py --device cuda --dtype bfloat16 --shape 7b --layers 2 --vocab 152064
step grpo_0.5b_qlora 300 python3 benchmarks/grpo_steps.py
step demo 300 python3 -m lora_manip.cli demo
