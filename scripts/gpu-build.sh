#!/usr/bin/env bash
# Builds, on a machine without a GPU, the binaries the GPU run needs (CUDA and Vulkan in one
# build), strips and gzips them into .dev-bin/ (git-ignored) so the device tool can carry them.
# TESTS=0 skips the kernel test binaries (attn_bench and toy-lm only: a cold build's first half).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-offline-cuda.sh
F=cuda,vulkan
out=.dev-bin; rm -rf "$out"; mkdir -p "$out"
cargo build --release -p sparse-attn-kernels --example attn_bench --features "sparse-attn-kernels/$F"
cargo build --release -p toy-lm --features "toy-lm/cuda,toy-lm/vulkan"
: > "$out/tests.txt"
if [ "${TESTS:-1}" != 0 ]; then
  msg=$(cargo test --release --no-run --message-format=json \
    -p sparse-attn-kernels -p sparse-attn-tests \
    --features "sparse-attn-kernels/$F,sparse-attn-tests/cuda,sparse-attn-tests/vulkan" 2>/dev/null)
  echo "$msg" | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
  ' > "$out/tests.txt"
fi
while read -r name exe; do
  case "$name" in attention|kernel_dispatch|training) cp "$exe" "$out/$name";; esac
done < "$out/tests.txt"
cp target/release/examples/attn_bench "$out/attn_bench"
cp target/release/toy-lm "$out/toy-lm"
for f in "$out"/*; do [ -x "$f" ] && [ -f "$f" ] && strip "$f" && gzip -9 "$f"; done
ls -la "$out"; du -sh "$out"
