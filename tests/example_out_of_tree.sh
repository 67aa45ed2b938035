#!/usr/bin/env bash
# The example plugin built out of tree with nothing but pkg-config and a
# compiler, then used by path in quantize, inspect and compare.
set -euo pipefail
root="${QLORA_SOURCE_ROOT:?}"
build="$(dirname "$(dirname "${QLORA_BIN:?}")")"
model="${QLORA_SHARED:?}/models/stories260K"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PKG_CONFIG_PATH="$build/meson-uninstalled${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
pkg-config --exists qlora || { echo "FAIL: pkg-config cannot find qlora in $build/meson-uninstalled"; exit 1; }
cp -r "$root/examples/rtn-int4" "$work/src"
make -s -C "$work/src" >/dev/null
so="$work/src/rtn_int4.so"
[ -f "$so" ] || { echo "FAIL: $so was not built"; exit 1; }
syms=$(nm -D --defined-only "$so" | awk '$2 == "T" {print $3}')
[ "$syms" = "ql_quantizer_entry" ] || { echo "FAIL: exported symbols: $syms"; exit 1; }
"$QLORA_BIN" quantize --quiet --quantizer="$so:group_size=64" "$model" -o "$work/out" >/dev/null
export QLORA_PLUGIN_PATH="$work/src:${QLORA_PLUGIN_PATH:-}"
"$QLORA_BIN" quantizers >"$work/list"
grep -q "^rtn_int4 " "$work/list" || { echo "FAIL: quantizers does not list rtn_int4"; cat "$work/list"; exit 1; }
"$QLORA_BIN" inspect "$work/out/model.safetensors" >"$work/inspect"
grep -q " rtn_int4 " "$work/inspect" || { echo "FAIL: inspect does not name rtn_int4"; cat "$work/inspect"; exit 1; }
"$QLORA_BIN" compare --quiet --summary-only --quantizers="nf4,$so" "$model" >"$work/table"
grep -q "^rtn_int4 " "$work/table" || { echo "FAIL: compare table lacks rtn_int4"; cat "$work/table"; exit 1; }
grep -q "^nf4 " "$work/table" || { echo "FAIL: compare table lacks nf4"; exit 1; }
echo "example plugin built out of tree and used by path: ok"
