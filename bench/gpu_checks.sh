#!/usr/bin/env bash
# Issue 11's GPU checks in one run, sized for a short device lease (not yet run on a GPU; each
# step has a timeout, at most 11.5 minutes in all): the CUDA tests (varlen attention, packed bf16 against per datum, the bf16 head against
# fp64), the bf16 head benchmark at N=16384, d=2048, V=131072 against naive, MFU of a
# forward_backward on the Qwen2.5-0.5B shape at 16k tokens, and a W=1 group on nccl. Each
# one's output goes to a file of OUTDIR; record the figures, with the card, in BENCHMARKS.md.
#
#   bash bench/gpu_checks.sh [OUTDIR]
#
# Needs a python3 (PYTHON=...) with CUDA torch, transformers, peft, safetensors and pytest;
# cispo is imported from this tree by its file paths (worker/cispo/worker, ...), nothing installed.
set -u
out=${1:-${OUT:-gpu-checks}}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/worker:$PWD/service:$PWD/client_py:$PWD/protos${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
check() {  # name, seconds, command...
    local name=$1 seconds=$2
    shift 2
    echo "== $name: $*"
    timeout "$seconds" "$@" > "$out/$name.txt" 2>&1 || { echo "   failed ($?), see $out/$name.txt"; status=1; }
}
nvidia-smi -L > "$out/card.txt" 2>&1
"$py" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" >> "$out/card.txt" 2>&1
check cuda_tests 150 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py
check head 240 "$py" bench/bench_logprob_head.py --device cuda
check mfu 180 "$py" bench/bench_mfu.py
check nccl 120 "$py" bench/bench_fsdp.py --device cuda --dtype bfloat16 --world-sizes 1
exit $status
