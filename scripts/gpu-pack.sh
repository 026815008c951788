#!/usr/bin/env bash
# Builds the CUDA kernel test and bench binaries of sparse-attn-kernels (no Burn: a few
# minutes from a warm target) and packs them, stripped and gzipped, into .dev-bin/ for the
# device tool (carry ".dev-bin"). scripts/gpu-build.sh builds the full set (Burn tests,
# toy-lm) for CUDA and Vulkan.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-offline-cuda.sh >/dev/null
json=$(cargo build -p sparse-attn-kernels --features cuda --tests --examples --message-format=json 2>/dev/null)
rm -rf .dev-bin; mkdir -p .dev-bin
echo "$json" | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    try: m = json.loads(line)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        name = m["target"]["name"]
        if name in ("attention", "attn_bench"):
            shutil.copy(m["executable"], ".dev-bin/" + name)
'
strip .dev-bin/*; gzip -9 .dev-bin/*; ls -la .dev-bin
