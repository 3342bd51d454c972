#!/usr/bin/env bash
# The one device job behind RESULTS.md's latest speed table: nanollm beside llm.c (built in the same
# job), this tree's kernels against the v1 kernels (environment variables) in the same job, the GPU
# tests of the kernels that changed and of the whole model, then time to the first step. Each step
# under its own limit and one overall deadline (DEADLINE, default 540 s: inside the device's 10
# minutes); full logs under $OUT/speed/, the step list last. From the repo root on the GPU host:
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
v1="NANOLLM_LN_FORWARD=v1,NANOLLM_LN_BACKWARD=v1,NANOLLM_CLASSIFIER=v1"
step vs_llmc 345 python3 benchmarks/vs_llmc.py --out "$out/vs_llmc" --deadline 300 --timeout 120 \
    --runs d12,d48,own,d12r0 --variant-runs d12,d48 --variant "v1 kernels:$v1"
step gpu_tests 130 python3 -m pytest -m gpu -q tests/test_model_gpu.py tests/kernels/test_classifier.py \
    tests/kernels/test_layernorm.py -k "not (layernorm and v2) and not test_layernorm_forward and not test_residual_forward"
step startup 60 python3 benchmarks/startup_times.py --runs d12-cold,d12 --timeout 50 --out "$out/startup"
for name in vs_llmc gpu_tests startup; do
    [ -f "$out/$name.log" ] || continue
    echo "===== $name (last lines of $out/$name.log)"
    grep -v "Warning\|warn(" "$out/$name.log" | tail -n 24
done
cat "$out/steps.txt"
