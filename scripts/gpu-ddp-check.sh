#!/usr/bin/env bash
# Runs on the 2-GPU machine (device tool, kind nvidia-h200-x2), from the repository root, with
# a CUDA build of toy-lm (`cargo build --release -p toy-lm --features cuda`) gzipped into
# BIN_DIR (default .dev-bin). Checks data-parallel training (`--devices cuda:0,cuda:1`)
# against one GPU on the same seed and global batch (`toy-lm ddp-check`), then measures the
# speed-up on a larger model. NCCL comes from PyTorch's wheel (nvidia-nccl), linked under the
# name the CUDA runtime looks for. Logs land in $OUT.
set -uo pipefail
export CUDARC_CUDA_VERSION=13000 RUST_BACKTRACE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bin=/tmp/bin; mkdir -p $bin
gunzip -c "${BIN_DIR:-.dev-bin}/toy-lm.gz" > $bin/toy-lm && chmod +x $bin/toy-lm
nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))')
mkdir -p /tmp/nccl && ln -sf "$nccl/libnccl.so.2" /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$nccl:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/gpus.txt"
tiny="--layers 2 --d-model 64 --heads 4 --kv-heads 2 --seq-len 128 --batch 8 --steps 8 --warmup 2 --eval-every 0 --eval-batches 1"
for m in ${METHODS:-dense nsa moba}; do
  echo "=== ddp-check, tiny model, $m"
  timeout 240 $bin/toy-lm ddp-check --devices cuda:0,cuda:1 $tiny --attention $m --out /tmp/ddp-$m 2>&1 | grep -v "^\[" | tail -4
done 2>&1 | tee "$OUT/ddp-check.log"
if [ -n "${SPEED:-1}" ]; then
  echo "=== ddp-check, 4 layers, d_model 512, 8/2 heads, context ${SEQ:-4096}, global batch 8, dense (speed-up)"
  timeout 400 $bin/toy-lm ddp-check --devices cuda:0,cuda:1 --layers 4 --d-model 512 --heads 8 --kv-heads 2 --seq-len ${SEQ:-4096} \
    --batch 8 --steps ${STEPS:-24} --warmup 4 --eval-every 0 --eval-batches 1 --tolerance ${TOL:-2e-2} --out /tmp/ddp-speed 2>&1 \
    | grep -v "^\[" | tail -4
fi 2>&1 | tee "$OUT/ddp-speed.log"
