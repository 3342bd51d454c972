#!/usr/bin/env bash
# One device job for issue 12's kernel candidates: every step under its own time limit and under one
# overall deadline (DEADLINE seconds, default 540, so the job ends inside the device's 10 minutes),
# the most decisive steps first, full logs under $OUT/candidates/, the step list printed last.
# Run from the repo root on the GPU host after `source benchmarks/gpu_env.sh`:
#     bash benchmarks/candidates_session.sh
# 1. the d12 training step with each candidate switched on (nanollm only; the last loss shows
#    whether a candidate keeps v1's numerics), 2. the three kernel benchmarks (bits against v1, ms),
# 3. time to the first step, cold (the first run of precompile's pool) and warm, 4. the candidates'
# GPU tests, 5. the Nsight Compute profile if time is left.
out="${OUT:-out}/candidates"
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
step whole_step 170 python3 benchmarks/vs_llmc.py --no-llmc --runs d12 --variant-runs d12 \
    --out "$out/vs_llmc" --timeout 60 --deadline 150 \
    --variant "ln3:NANOLLM_LN_FORWARD=v3,NANOLLM_LN_BACKWARD=v3" \
    --variant "ln4:NANOLLM_LN_FORWARD=v3,NANOLLM_LN_BACKWARD=v4" \
    --variant "cls2:NANOLLM_CLASSIFIER=v2" \
    --variant "bias2:NANOLLM_BIAS_GRAD=v2" \
    --variant "biasE:NANOLLM_BIAS_GRAD=epilogue"
step layernorm 90 python3 benchmarks/layernorm_candidates.py
step classifier 60 python3 benchmarks/classifier_candidates.py
step bias 60 python3 benchmarks/bias_grad_candidates.py
step startup 90 python3 benchmarks/startup_times.py --runs d12-cold,d12 --timeout 60 --out "$out/startup"
step gpu_tests 150 python3 -m pytest -m gpu -q -x tests/kernels/test_layernorm.py tests/kernels/test_bf16.py \
    tests/kernels/test_classifier.py tests/kernels/test_matmul.py
step ncu 120 python3 benchmarks/kernel_ncu.py --out "$out/ncu"
for name in whole_step layernorm classifier bias startup gpu_tests ncu; do
    [ -f "$out/$name.log" ] || continue
    echo "===== $name (last lines of $out/$name.log)"
    tail -n 25 "$out/$name.log"
done
cat "$out/steps.txt"
