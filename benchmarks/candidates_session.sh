#!/usr/bin/env bash
# One device job for issue 12's kernel candidates (branch issue-12-candidates): each step under its
# own time limit, full logs under $OUT/candidates/, the tables printed last. Run from the repo root
# on the GPU host after `source benchmarks/gpu_env.sh`:
#     bash benchmarks/candidates_session.sh            # ~8 min on one H200 (estimate: never run yet)
# Then the whole step with the winners beside llm.c, e.g.
#     LLMC_DIR=.scratch/llm.c python3 benchmarks/vs_llmc.py --runs d12,d48 --variant-runs d12,d48 \
#         --variant "ln:NANOLLM_LN_FORWARD=v3,NANOLLM_LN_BACKWARD=v4" --variant "cls:NANOLLM_CLASSIFIER=v2"
out="${OUT:-out}/candidates"
mkdir -p "$out"
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$out/steps.txt"
}
step startup 200 python3 benchmarks/startup_times.py --runs d12-cold,d12,d12-own,d48 --timeout 90 --out "$out/startup"
step layernorm 120 python3 benchmarks/layernorm_candidates.py
step classifier 120 python3 benchmarks/classifier_candidates.py
step bias 120 python3 benchmarks/bias_grad_candidates.py
step gpu_tests 240 python3 -m pytest -m gpu -q tests/kernels/test_layernorm.py tests/kernels/test_bf16.py \
    tests/kernels/test_classifier.py tests/kernels/test_matmul.py
step ncu 180 python3 benchmarks/kernel_ncu.py --out "$out/ncu"
for name in startup layernorm classifier bias gpu_tests ncu; do
    echo "===== $name (last lines of $out/$name.log)"
    tail -n 30 "$out/$name.log"
done
cat "$out/steps.txt"
