#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root, after scripts/gpu-build.sh
# built and carried .dev-bin/ (and .gl/ with the Vulkan loader). Everything lands in $OUT.
set -uo pipefail
export CUDARC_CUDA_VERSION=13000 XDG_RUNTIME_DIR=/tmp RUST_BACKTRACE=1
[ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] && export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bin=/tmp/bin; rm -rf $bin; mkdir -p $bin
for f in ${BIN_DIR:-.dev-bin}/*.gz; do gunzip -c "$f" > $bin/$(basename "$f" .gz); chmod +x $bin/$(basename "$f" .gz); done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
step() { echo "=== $*"; }
{
step kernel tests CUDA f32,f16,bf16
SPARSE_ATTN_RUNTIME=cuda SPARSE_ATTN_DTYPES=f32,f16,bf16 timeout 300 $bin/attention --test-threads 4 2>&1 | grep -E "test result|FAILED|panicked|runtime=" | head -20
step kernel tests Vulkan f32,f16,bf16
SPARSE_ATTN_RUNTIME=vulkan SPARSE_ATTN_DTYPES=f32,f16,bf16 timeout 300 $bin/attention --test-threads 4 2>&1 | grep -E "test result|FAILED|panicked|runtime=" | head -20
step kernels through Burn, CUDA and Vulkan
SPARSE_ATTN_RUNTIME=cuda timeout 200 $bin/kernel_dispatch 2>&1 | grep -E "test result|FAILED|panicked" | head
SPARSE_ATTN_RUNTIME=vulkan timeout 200 $bin/kernel_dispatch 2>&1 | grep -E "test result|FAILED|panicked" | head
} 2>&1 | tee "$OUT/tests.log"
{
for s in 4096 16384; do
  step "attn_bench s=$s bf16 (ours, CUDA) and SDPA"
  SPARSE_ATTN_RUNTIME=cuda timeout 240 $bin/attn_bench --b 1 --hq 16 --hkv 16 --s $s --d 128 --dtype bf16 --iters 3 2>&1 | tail -4
  python3 scripts/sdpa_bench.py s=$s dtype=bf16 iters=5 2>&1 | tail -3
done
step "memory: seq 32k, 16 heads, d 128, fwd+bwd (nvidia-smi peak while running)"
( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.2; done ) > /tmp/mem.txt & mp=$!
SPARSE_ATTN_RUNTIME=cuda timeout 240 $bin/attn_bench --b 1 --hq 16 --hkv 16 --s 32768 --d 128 --dtype bf16 --iters 1 --only dense 2>&1 | tail -3
kill $mp; echo "dense peak MiB: $(sort -n /tmp/mem.txt | tail -1)"
( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.2; done ) > /tmp/mem2.txt & mp=$!
SPARSE_ATTN_RUNTIME=cuda timeout 240 $bin/attn_bench --b 1 --hq 16 --hkv 16 --s 32768 --d 128 --dtype bf16 --iters 1 --only nsa 2>&1 | tail -3
kill $mp; echo "nsa-sparse peak MiB: $(sort -n /tmp/mem2.txt | tail -1)"
} 2>&1 | tee "$OUT/bench.log"
[ -x $bin/toy-lm ] || exit 0
step toy-lm compare on CUDA | tee "$OUT/toylm.log"
timeout 400 $bin/toy-lm compare --device cuda --out /tmp/cmp ${TOYLM_ARGS:-} 2>&1 | tail -25 | tee -a "$OUT/toylm.log"
cp /tmp/cmp/results.md /tmp/cmp/results.json /tmp/cmp/loss.png "$OUT/" 2>/dev/null
true
