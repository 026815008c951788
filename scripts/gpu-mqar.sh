#!/usr/bin/env bash
# MQAR runs on the GPU machine (device tool), from the repository root, with a CUDA build of
# toy-lm gzipped into BIN_DIR (default .dev-bin). RUNS holds one run per line:
# `<name> <toy-lm compare flags...>` (or RUNS_FILE names a file of such lines); every run gets the shared flags below plus its own, all
# runs go at once (small models: they share the GPU, so their speeds are not measurements),
# each under LIMIT seconds. Logs and results land in $OUT/mqar-<name>/, then packed into
# $OUT/mqar.tgz (the device tool brings back at most 8 files; PACK=0 keeps the folders).
set -uo pipefail
export CUDARC_CUDA_VERSION=13000 RUST_BACKTRACE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bin=/tmp/bin; mkdir -p $bin
[ -x $bin/toy-lm ] || { gunzip -c "${BIN_DIR:-.dev-bin}/toy-lm.gz" > $bin/toy-lm && chmod +x $bin/toy-lm; }
shared="--device cuda --dtype bf16 --task mqar --log-every 250 --eval-every 250 --eval-batches 8"
while read -r name args; do
  [ -z "$name" ] && continue
  dir=/tmp/mqar-$name; mkdir -p "$OUT/mqar-$name"
  ( timeout ${LIMIT:-420} $bin/toy-lm compare $shared $args --out $dir > "$OUT/mqar-$name/run.log" 2>&1
    echo "rc $?" >> "$OUT/mqar-$name/run.log"
    cp $dir/results.json $dir/results.md $dir/command.txt $dir/*.svg "$OUT/mqar-$name/" 2>/dev/null
    for m in $dir/*/selection.svg; do [ -f "$m" ] && cp "$m" "$OUT/mqar-$name/selection-$(basename $(dirname $m)).svg"; done ) &
done <<< "${RUNS:-$(cat "$RUNS_FILE")}"
wait
for d in "$OUT"/mqar-*; do echo "== $(basename $d): $(grep -m1 -oE "\-\-methods.*" $d/command.txt 2>/dev/null | cut -c1-150)"; grep -iE "accuracy|rc |error" "$d/run.log" | tail -${TAIL:-3}; done
if [ "${PACK:-1}" = 1 ]; then (cd "$OUT" && tar czf mqar.tgz mqar-* && rm -rf mqar-*); fi
