#!/usr/bin/env bash
# The byte-level LM reference run on the GPU machine (device tool), from the repository root,
# with a CUDA build of toy-lm gzipped into BIN_DIR (default .dev-bin). One process per method
# (METHODS, e.g. "dense moba"), each under LIMIT seconds: 8 layers, d_model 512, 8 query / 2 kv
# heads of dim 64, context 8192, bf16, the library's long-context method settings, on the
# machine's own Python sources as text (built below, in path order, 48 MB; the last 10 % is
# the validation split). Small files (results, figures, logs) land in $OUT.
set -uo pipefail
export CUDARC_CUDA_VERSION=13000 RUST_BACKTRACE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bin=/tmp/bin; mkdir -p $bin
[ -x $bin/toy-lm ] || { gunzip -c "${BIN_DIR:-.dev-bin}/toy-lm.gz" > $bin/toy-lm && chmod +x $bin/toy-lm; }
if [ ! -s /tmp/corpus.txt ]; then
  site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))')
  find /usr/lib/python3* $site -name '*.py' -type f 2>/dev/null | LC_ALL=C sort | xargs cat 2>/dev/null \
    | iconv -f utf-8 -t utf-8 -c | head -c 48000000 > /tmp/corpus.txt
fi
{ ls -l /tmp/corpus.txt; md5sum /tmp/corpus.txt; } | tee "$OUT/corpus.info"
SEED=${SEED:-42}; STEPS=${STEPS:-2000}
for m in ${METHODS:-dense}; do
  dir=/tmp/lm-$m-s$SEED
  echo "=== $m, seed $SEED, $STEPS steps"
  timeout ${LIMIT:-280} $bin/toy-lm compare --device cuda --dtype bf16 --methods $m --layers 8 --d-model 512 \
    --heads 8 --kv-heads 2 --batch 1 --seq-len 8192 --steps $STEPS --eval-every 250 --eval-batches 16 \
    --log-every 250 --seed $SEED --text /tmp/corpus.txt --moba-block-size 512 --moba-top-k 3 \
    --nsa-compress-block 32 --nsa-compress-stride 16 --nsa-select-block 64 --nsa-top-n 16 --nsa-window 512 \
    --seer-block-size 64 --seer-top-k 16 --dma-window 2048 --out $dir 2>&1
  echo "rc $?"
  mkdir -p "$OUT/lm-$m-s$SEED"
  cp $dir/results.json $dir/results.md $dir/loss.svg $dir/command.txt "$OUT/lm-$m-s$SEED/" 2>/dev/null
done 2>&1 | tee -a "$OUT/lm.log"
