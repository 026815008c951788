#!/usr/bin/env bash
# Speed and memory of the toy LM's training step per method against the context, on the GPU
# machine (device tool), from the repository root, with a CUDA build of toy-lm gzipped into
# BIN_DIR (default .dev-bin). The reference model of the LM runs (8 layers, d_model 512,
# 8 query / 2 kv heads of dim 64, bf16, batch 1) and the library's long-context method
# settings; one process per (context, method), run alone on the GPU, STEPS steps each (the
# first 2 are warm-up: compilation, pool growth). CubeCL's compilation cache is on, so later
# processes reuse kernels. Everything lands in $OUT/sweep.tar.gz (results.json per run, logs).
set -uo pipefail
export CUDARC_CUDA_VERSION=13000 RUST_BACKTRACE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bin=/tmp/bin; mkdir -p $bin
[ -x $bin/toy-lm ] || { gunzip -c "${BIN_DIR:-.dev-bin}/toy-lm.gz" > $bin/toy-lm && chmod +x $bin/toy-lm; }
printf '[compilation]\ncache = true\n' > cubecl.toml
work=/tmp/sweep; mkdir -p $work
for s in ${CONTEXTS:-8192 16384 32768 65536 4096}; do
  for m in ${METHODS:-dense nsa moba seer dma}; do
    dir=$work/s$s-$m
    timeout ${LIMIT:-100} $bin/toy-lm compare --device cuda --dtype bf16 --layers 8 --d-model 512 --heads 8 --kv-heads 2 \
      --batch 1 --eval-every 0 --eval-batches 1 --log-every 1 --val-fraction 0.2 --moba-block-size 512 --moba-top-k 3 \
      --nsa-compress-block 32 --nsa-compress-stride 16 --nsa-select-block 64 --nsa-top-n 16 --nsa-window 512 \
      --seer-block-size 64 --seer-top-k 16 --dma-window 2048 --steps ${STEPS:-6} --methods $m --seq-len $s --out $dir \
      > $work/s$s-$m.log 2>&1
    echo "s$s $m rc $? $(grep -E "^\| $m" $work/s$s-$m.log | head -1)"
  done
done | tee $work/summary.txt
rm -f cubecl.toml
tar czf "$OUT/sweep.tar.gz" --exclude=checkpoint -C /tmp sweep
