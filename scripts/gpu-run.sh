#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root, after scripts/gpu-build.sh
# built the binaries here. Carry the folder named by BIN_DIR (default .dev-bin; the device
# tool carries at most 64 MiB, so carry a subset: see docs/results/kernels-h100.md) and .gl/
# (the Vulkan loader). PARTS picks the sections (default: tests bench); results land in $OUT.
set -uo pipefail
export CUDARC_CUDA_VERSION=13000 XDG_RUNTIME_DIR=/tmp RUST_BACKTRACE=1
[ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] && export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -d .gl ] && ! ldconfig -p | grep -q libvulkan.so.1; then for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig; fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bin=/tmp/bin; rm -rf $bin; mkdir -p $bin
for f in ${BIN_DIR:-.dev-bin}/*.gz; do gunzip -c "$f" > $bin/$(basename "$f" .gz); chmod +x $bin/$(basename "$f" .gz); done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
step() { echo "=== $*"; }
has() { [[ " ${PARTS:-tests bench} " == *" $1 "* ]] && [ -x "$bin/$2" ]; }
summary() { grep -E "test result|FAILED|panicked|runtime=" | grep -v "^test .* ok$" | head -24; }

# The kernel suite has grown past what one process finishes in a few minutes: each
# configuration runs as its own process, all at once (the GPU and 16 cores have room), with
# TEST_LIMIT seconds each; the summary lands in $OUT/tests.log and every whole log, one after
# another, in $OUT/tests-full.log (the device tool brings back only a few files).
rm -rf /tmp/tests; mkdir -p /tmp/tests  # a warm machine keeps an earlier call's logs
suite() {  # NAME BINARY ENV...: one test process in the background
  local name=$1 exe=$2; shift 2
  ( env "$@" timeout ${TEST_LIMIT:-540} $bin/$exe --test-threads 4 > "/tmp/tests/$name.log" 2>&1
    echo "exit $?" >> "/tmp/tests/$name.log" ) &
}
if has tests attention; then
  for dt in f32 f16 bf16; do  # tensor cores; f32 as TF32
    suite attention-cuda-$dt attention SPARSE_ATTN_RUNTIME=cuda SPARSE_ATTN_DTYPES=$dt
  done
  suite attention-cuda-portable-f32 attention SPARSE_ATTN_KERNEL_PATH=portable SPARSE_ATTN_RUNTIME=cuda SPARSE_ATTN_DTYPES=f32
  [ -d .gl ] && suite attention-vulkan attention SPARSE_ATTN_RUNTIME=vulkan SPARSE_ATTN_DTYPES=f32,f16,bf16
fi
if has tests kernel_dispatch; then  # kernels through Burn + autodiff against the reference
  suite dispatch-cuda kernel_dispatch SPARSE_ATTN_RUNTIME=cuda
  suite dispatch-cuda-portable kernel_dispatch SPARSE_ATTN_KERNEL_PATH=portable SPARSE_ATTN_RUNTIME=cuda
  [ -d .gl ] && suite dispatch-vulkan kernel_dispatch SPARSE_ATTN_RUNTIME=vulkan
fi
if has tests training; then suite training-cuda training SPARSE_ATTN_RUNTIME=cuda; fi
wait
for f in /tmp/tests/*.log; do
  [ -f "$f" ] || continue
  step "$(basename "$f" .log)" | tee -a "$OUT/tests-full.log"; cat "$f" >> "$OUT/tests-full.log"
  summary < "$f"; tail -1 "$f"
done 2>&1 | tee "$OUT/tests.log"
if has bench attn_bench; then {
  for s in 4096 16384; do
    step "attn_bench s=$s bf16, CUDA tensor cores: Hkv=16 (NSA lists per head) and Hkv=1 (NSA lists shared by 16 heads)"
    SPARSE_ATTN_RUNTIME=cuda timeout 120 $bin/attn_bench --b 1 --hq 16 --hkv 16 --s $s --d 128 --dtype bf16 --iters 3 2>&1 | tail -2
    SPARSE_ATTN_RUNTIME=cuda timeout 120 $bin/attn_bench --b 1 --hq 16 --hkv 1 --s $s --d 128 --dtype bf16 --iters 3 2>&1 | tail -2
    step "PyTorch SDPA s=$s bf16"
    python3 scripts/sdpa_bench.py s=$s dtype=bf16 iters=5 2>&1 | tail -3
  done
  step "attn_bench s=4096 bf16, CUDA portable path (same binary, SPARSE_ATTN_KERNEL_PATH=portable)"
  SPARSE_ATTN_KERNEL_PATH=portable SPARSE_ATTN_RUNTIME=cuda timeout 120 $bin/attn_bench --b 1 --hq 16 --hkv 1 --s 4096 --d 128 --dtype bf16 --iters 3 2>&1 | tail -2
  step "memory: seq 32k, 16 heads, d 128, bf16 fwd+bwd (nvidia-smi peak while running)"
  for only in dense nsa; do
    ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.2; done ) > /tmp/mem.txt & mp=$!
    SPARSE_ATTN_RUNTIME=cuda timeout 200 $bin/attn_bench --b 1 --hq 16 --hkv 1 --s 32768 --d 128 --dtype bf16 --iters 1 --only $only 2>&1 | tail -1
    kill $mp; echo "$only peak MiB: $(sort -n /tmp/mem.txt | tail -1)"
  done
} 2>&1 | tee "$OUT/bench.log"; fi
if has engine attn_bench; then {
  # ENGINE_SEQS / ENGINE_DIMS / ENGINE_HEADS ("hq/hkv ...") / ENGINE_DTYPES pick the sweep; every
  # row goes to $OUT/engine.jsonl (ours: attn_bench --json; SDPA: sdpa_bench.py json=).
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  for dt in ${ENGINE_DTYPES:-bf16}; do for d in ${ENGINE_DIMS:-128}; do for hh in ${ENGINE_HEADS:-64/4}; do
    hq=${hh%/*}; hkv=${hh#*/}
    for s in ${ENGINE_SEQS:-8192 16384}; do
      step "engine s=$s d=$d hq=$hq hkv=$hkv $dt"
      SPARSE_ATTN_RUNTIME=cuda timeout 200 $bin/attn_bench --b 1 --hq $hq --hkv $hkv --s $s --d $d --dtype $dt \
        --iters ${ENGINE_ITERS:-5} --only ${ENGINE_ONLY:-all} --json "$OUT/engine.jsonl" --gpu "$gpu" 2>&1 | grep -v "^runtime="
      python3 scripts/sdpa_bench.py b=1 h=$hq hkv=$hkv s=$s d=$d dtype=$dt iters=${ENGINE_ITERS:-5} json="$OUT/engine.jsonl" 2>&1 | grep -v efficient
    done
  done; done; done
} 2>&1 | tee "$OUT/engine.log"; fi
if has methods method_bench; then {
  # METHOD_SEQS / METHOD_DIMS / METHOD_ONLY pick the sweep of every method's functional op
  # (fwd and fwd+bwd under autodiff, against our dense and Burn's attention); rows go to
  # $OUT/methods.jsonl.
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  for d in ${METHOD_DIMS:-128}; do for s in ${METHOD_SEQS:-16384}; do
    step "method_bench s=$s d=$d"
    timeout ${METHOD_TIMEOUT:-300} $bin/method_bench --s $s --hq 64 --hkv 4 --d $d --dtype bf16 --iters ${METHOD_ITERS:-3} \
      --only ${METHOD_ONLY:-dense,burn,moba,moba-given,nsa,nsa-given,dma,seer} --json "$OUT/methods.jsonl" --gpu "$gpu" 2>&1 | grep -v "^runtime="
  done; done
} 2>&1 | tee "$OUT/methods.log"; fi
if has profile method_bench; then
  # One fwd+bwd per method of PROFILE_ONLY with CubeCL's kernel profiler: every kernel and
  # its device time in $OUT/profile-METHOD.log (the timed ops serialise, so read shares, not
  # totals).
  for m in ${PROFILE_ONLY:-moba nsa}; do
    printf '[profiling.logger]\nlevel = "basic"\nfile = "%s"\nappend = false\n' "$OUT/profile-$m.log" > cubecl.toml
    timeout 200 $bin/method_bench --s ${PROFILE_SEQ:-16384} --hq 64 --hkv 4 --d 128 --dtype bf16 --iters 1 --only $m 2>&1 | grep -v "^runtime=" | tail -1
    rm -f cubecl.toml
  done
fi
if has toylm toy-lm; then
  # TOYLM_RUNS: runs separated by ';', each `NAME ARGS...` (or TOYLM_ARGS for a single run).
  # Kernels compiled by an earlier method of the same run are reused (CubeCL's compilation
  # cache). TOYLM_PROFILE=1 adds CubeCL's kernel profile of each run, gzipped, as
  # $OUT/prof-NAME.log.gz (sum a step with scripts/profile_summary.py --categories; the
  # profiler serialises launches, so compare profiles with profiles).
  IFS=';' read -ra runs <<< "${TOYLM_RUNS:-cmp ${TOYLM_ARGS:-}}"
  for run in "${runs[@]}"; do
    read -r name args <<< "$run"
    printf '[compilation]\ncache = true\n' > cubecl.toml
    [ "${TOYLM_PROFILE:-0}" = 1 ] && printf '[profiling.logger]\nlevel = "basic"\nfile = "/tmp/prof-%s.log"\nappend = false\n' "$name" >> cubecl.toml
    step "toy-lm compare on CUDA ($name): $args" | tee "$OUT/toylm-$name.log"
    timeout ${TOYLM_TIMEOUT:-500} $bin/toy-lm compare --device cuda --out /tmp/$name $args 2>&1 \
      | grep -v "data: byte LM on" | tee -a "$OUT/toylm-$name.log" | grep -E "validation @|^\|"
    mkdir -p "$OUT/$name"; cp /tmp/$name/*.* "$OUT/$name/" 2>/dev/null
    [ -f /tmp/prof-$name.log ] && gzip -c /tmp/prof-$name.log > "$OUT/prof-$name.log.gz"
    rm -f cubecl.toml
  done
fi
true
