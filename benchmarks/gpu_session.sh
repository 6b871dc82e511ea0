#!/usr/bin/env bash
# Everything a session with a GPU measures, in one device call: most important first, each step
# time-boxed, every result written as it comes, so a call cut short still returns what it measured.
#
#   here (CPU machine, once):  make gpu-wheels        # pytest & numpy wheels for a bare GPU image
#   device call:               BUDGET=540 bash benchmarks/gpu_session.sh   (carry: .gpu_wheels)
#   with the call's timeout ≈ BUDGET + 50 s (less device time left: a smaller BUDGET)
#
# Steps (seconds of the ${BUDGET:-540} s budget):
#   1. environment and install (pip install --no-deps -e ., test dependencies from .gpu_wheels)
#   2. the headline benchmark: the issue's targets               (until 300 s before the end)
#   3. the GPU test tier, pytest -m gpu in four parallel shards  (≤ 200 s)
#      (with the pairwise-MLP critic's kernels, tests/test_pairwise_kernels_gpu.py, as a fifth shard)
#   4. the pairwise-MLP critic: fused Triton kernels against eager, B = N = 16384, H = 256, bf16
#                                                                  (≤ 60 s)
#   5. PID solver throughput on the GPU at (10, 10, 10) and (10, 20, 20), n = 256, 4096 and
#      65536, then the largest batch that fits                       (≤ 90 s)
#   6. the benchmark sweep                                        (what is left)
# Results: $OUT (the device tool's return folder), else benchmarks/results/gpu-session/. The device
# tool brings back at most 8 files, so on the way out (also when a step times out or the script is
# stopped) everything is packed into $OUT/gpu_session.tar.gz, beside session.log and the headline
# table (headline.md), which is printed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-session}
PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
start=$(date +%s)
elapsed() { echo $(($(date +%s) - start)); }
left() { echo $((BUDGET - $(elapsed))); }
step() { echo "== [$(elapsed) s] $*" | tee -a "$OUT/session.log"; }

pack() {
    trap - EXIT INT TERM
    step "pack"
    local headline
    headline=$(ls "$OUT"/gpu_*.md 2>/dev/null | head -1)
    [ -n "$headline" ] && cp "$headline" "$OUT/headline.md"
    tar czf "$OUT.tar.gz.part" -C "$OUT" --exclude gpu_session.tar.gz . &&
        find "$OUT" -mindepth 1 -maxdepth 1 ! -name session.log ! -name headline.md -exec rm -rf {} + &&
        mv "$OUT.tar.gz.part" "$OUT/gpu_session.tar.gz"
    ls "$OUT"
    [ -f "$OUT/headline.md" ] && cat "$OUT/headline.md"
}
trap pack EXIT
trap 'exit 130' INT TERM
step "environment"
{
    nvidia-smi
    "$PY" - <<'EOF'
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| triton", triton.__version__, "|", torch.cuda.get_device_name())
EOF
} > "$OUT/environment.txt" 2>&1
tail -1 "$OUT/environment.txt"

step "install"
# Offline: build isolation may find setuptools only among the carried wheels, or not at all.
export PIP_FIND_LINKS="$PWD/.gpu_wheels"
{ "$PY" -m pip install --no-deps -e . || "$PY" -m pip install --no-deps --no-build-isolation -e .; } > "$OUT/install.txt" 2>&1 ||
    { cat "$OUT/install.txt"; exit 1; }
for module in numpy pytest inf_cl; do
    "$PY" -c "import $module" 2>/dev/null ||
        "$PY" -m pip install --no-index --find-links .gpu_wheels "${module/_/-}" >> "$OUT/install.txt" 2>&1 ||
        echo "$module is missing and not in .gpu_wheels (make gpu-wheels)"
done

step "headline benchmark"
headline_s=$(($(left) - 300))
timeout $((headline_s > 60 ? headline_s : 60)) "$PY" benchmarks/gpu_benchmark.py --plan headline --out "$OUT" \
    > "$OUT/headline.log" 2>&1
echo "exit $?" >> "$OUT/headline.log"
tail -3 "$OUT/headline.log"

# Four pytest processes side by side: the tier's time is mostly Triton compiling kernels, one CPU
# core per process; the tests check values, so sharing the GPU does not matter.
step "GPU test tier"
shards=("infonce" "nwj or dv" "smile or js" "not (infonce or nwj or dv or smile or js)")
for i in "${!shards[@]}"; do
    timeout 200 "$PY" -m pytest tests/test_gpu.py -m gpu -k "${shards[$i]}" -q -p no:cacheprovider -rfE \
        --junitxml "$OUT/gpu_tests_$i.xml" > "$OUT/gpu_tests_$i.txt" 2>&1 &
done
timeout 200 "$PY" -m pytest tests/test_pairwise_kernels_gpu.py -m gpu -q -p no:cacheprovider -rfE \
    --junitxml "$OUT/gpu_tests_pairwise.xml" > "$OUT/gpu_tests_pairwise.txt" 2>&1 &
wait
for i in "${!shards[@]}"; do echo "shard $i (${shards[$i]}): $(tail -1 "$OUT/gpu_tests_$i.txt")"; done
echo "pairwise-MLP critic: $(tail -1 "$OUT/gpu_tests_pairwise.txt")"

step "pairwise-MLP critic"
timeout 60 "$PY" benchmarks/pairwise_gpu_benchmark.py --batch 16384 --hidden 256 --dtype bfloat16 --out "$OUT" \
    > "$OUT/pairwise.log" 2>&1
echo "exit $?" >> "$OUT/pairwise.log"
tail -8 "$OUT/pairwise.log"

step "PID on the GPU"
timeout 90 "$PY" benchmarks/pid_benchmark.py --device cuda --n 256 4096 65536 --shapes 10x10x10 10x20x20 \
    --cvxpy-sample 0 --largest-batch --out "$OUT" > "$OUT/pid.log" 2>&1
echo "exit $?" >> "$OUT/pid.log"
cat "$OUT/pid.log"

step "benchmark sweep"
if [ "$(left)" -gt 30 ]; then
    timeout $(($(left) - 10)) "$PY" benchmarks/gpu_benchmark.py --plan sweep --budget-s $(($(left) - 40)) \
        --out "$OUT/sweep" > "$OUT/sweep.log" 2>&1
    echo "exit $?" >> "$OUT/sweep.log"
fi
step "done"
