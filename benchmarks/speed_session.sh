#!/usr/bin/env bash
# The one device job behind RESULTS.md's latest speed table: nanollm beside llm.c (built in the same
# job), this tree against itself with cuBLASLt's first heuristic algorithms (llm.c's choice) in the
# same job, the GPU tests of what changed and of the whole model, time to the first step, and the
# timed algorithm choices. Each step under its own limit and one overall deadline (DEADLINE,
# default 540 s: inside the device's 10 minutes); full logs under $OUT/speed/, the step list last.
# From the repo root on the GPU host:
#     source benchmarks/gpu_env.sh && LLMC_DIR=.scratch/llm.c bash benchmarks/speed_session.sh
out="${OUT:-out}/speed"
mkdir -p "$out"
deadline=${DEADLINE:-540}
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "$name: skipped (deadline)" | tee -a "$out/steps.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s (limit $limit)" | tee -a "$out/steps.txt"
}
heuristic="NANOLLM_MATMUL_ALGORITHM=heuristic"
step vs_llmc 345 python3 benchmarks/vs_llmc.py --out "$out/vs_llmc" --deadline 300 --timeout 120 \
    --runs d12,d48,own,d12r0 --variant-runs d12,d48 --variant "cuBLASLt's first algorithms (llm.c's):$heuristic"
step gpu_tests 150 python3 -m pytest -m gpu -q tests/test_model_gpu.py tests/kernels/test_matmul_tuning.py \
    tests/kernels/test_adamw.py tests/kernels/test_layernorm.py -k "not test_layernorm_forward and not test_residual_forward"
step startup 60 python3 benchmarks/startup_times.py --runs d12-cold,d12 --timeout 50 --out "$out/startup"
step algorithms 20 python3 benchmarks/matmul_algorithms.py
for name in vs_llmc gpu_tests startup algorithms; do
    [ -f "$out/$name.log" ] || continue
    echo "===== $name (last lines of $out/$name.log)"
    grep -v "Warning\|warn(" "$out/$name.log" | tail -n 24
done
cat "$out/steps.txt"
