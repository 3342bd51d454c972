#!/usr/bin/env bash
# One device job for issue 12's kernel candidates: every step under its own time limit and under one
# overall deadline (DEADLINE seconds, default 540, so the job ends inside the device's 10 minutes),
# full logs under $OUT/candidates/, the step list printed last. Run from the repo root on the GPU
# host after `source benchmarks/gpu_env.sh`:
#     bash benchmarks/candidates_session.sh
# Second pass (the first showed ln v3 3.1 ms and classifier v2 1.1 ms faster per d12 step, ln v3
# with another last loss, bias v2 and the BGRADB epilogue no gain or refused, ln backward v4 not
# compiling on CUDA 13's NVVM): 1. layernorm v1-v3 kernels, bits against v1 and ms, 2. their GPU
# tests and the classifier's, 3. the d12 step with ln forward and backward v3 apart and together
# with classifier v2, d48 with the combination, 4. per-kernel time of a step (torch.profiler),
# 5. each kernel's compile time in a 16-process pool, 6. the Nsight Compute profile.
out="${OUT:-out}/candidates"
mkdir -p "$out"
deadline=${DEADLINE:-540}
best="NANOLLM_LN_FORWARD=v3,NANOLLM_LN_BACKWARD=v3,NANOLLM_CLASSIFIER=v2"
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
step layernorm 60 python3 benchmarks/layernorm_candidates.py --forward-variants v1,v2,v3 --backward-variants v1,v2,v3
step gpu_tests 90 python3 -m pytest -m gpu -q tests/kernels/test_layernorm.py tests/kernels/test_bf16.py \
    tests/kernels/test_classifier.py -k "not v4"
step whole_d12 130 python3 benchmarks/vs_llmc.py --no-llmc --runs d12 --variant-runs d12 \
    --out "$out/vs_llmc_d12" --timeout 60 --deadline 110 \
    --variant "ln3f:NANOLLM_LN_FORWARD=v3" --variant "ln3b:NANOLLM_LN_BACKWARD=v3" \
    --variant "ln2:NANOLLM_LN_FORWARD=v2,NANOLLM_LN_BACKWARD=v2" --variant "ln3+cls2:$best"
step whole_d48 90 python3 benchmarks/vs_llmc.py --no-llmc --runs d48 --variant-runs d48 \
    --out "$out/vs_llmc_d48" --timeout 60 --deadline 70 --variant "ln3+cls2:$best"
step profile 50 env NANOLLM_LN_FORWARD=v3 NANOLLM_LN_BACKWARD=v3 NANOLLM_CLASSIFIER=v2 \
    python3 benchmarks/step_profile.py -e d12 -b 64 -t 1024 --attention cudnn --top 30
step precompile 60 env NUMBA_CACHE_DIR=/tmp/precompile_cache python3 -m nanollm.precompile --all
step ncu 100 env NANOLLM_LN_FORWARD=v3 NANOLLM_LN_BACKWARD=v3 NANOLLM_CLASSIFIER=v2 \
    python3 benchmarks/kernel_ncu.py --out "$out/ncu"
for name in layernorm gpu_tests whole_d12 whole_d48 profile precompile ncu; do
    [ -f "$out/$name.log" ] || continue
    echo "===== $name (last lines of $out/$name.log)"
    grep -v "Warning\|warn(" "$out/$name.log" | tail -n 22
done
cat "$out/steps.txt"
