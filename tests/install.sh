#!/usr/bin/env bash
# meson install of this build into a staging folder (--destdir), then the
# installed qlora run with nothing pointing at it: no LD_LIBRARY_PATH, no
# QLORA_PLUGIN_PATH.  It must start (libqlora through its $ORIGIN rpath),
# find its own installed plugins, never search or name the build tree, and
# the example plugin must build against the installed header through the
# installed qlora.pc.
set -euo pipefail
: "${MESON:?}" "${QLORA_INSTALL_PREFIX:?}" "${QLORA_INSTALL_BINDIR:?}" "${QLORA_INSTALL_LIBDIR:?}"
root="${QLORA_SOURCE_ROOT:?}"
build="$(dirname "$(dirname "${QLORA_BIN:?}")")"
model="${QLORA_SHARED:?}/models/stories260K"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# the build is whole already (meson test built it); a rebuild here would
# race the other tests
"$MESON" install -C "$build" --no-rebuild --destdir "$work/d" --quiet >"$work/install.log" 2>&1 ||
    { cat "$work/install.log"; fail "meson install --destdir failed"; }
case "$QLORA_INSTALL_BINDIR" in /*) bindir="$work/d$QLORA_INSTALL_BINDIR" ;; *) bindir="$work/d$QLORA_INSTALL_PREFIX/$QLORA_INSTALL_BINDIR" ;; esac
case "$QLORA_INSTALL_LIBDIR" in /*) libdir="$work/d$QLORA_INSTALL_LIBDIR" ;; *) libdir="$work/d$QLORA_INSTALL_PREFIX/$QLORA_INSTALL_LIBDIR" ;; esac
qlora="$bindir/qlora"
[ -x "$qlora" ] || fail "no $qlora after meson install"
plugins="$(cd "$libdir/qlora/plugins" && pwd -P)"

run() { env -u LD_LIBRARY_PATH -u QLORA_PLUGIN_PATH -u LD_PRELOAD "$@"; }

# starts, and lists the plugins of the installed plugin folder
run "$qlora" quantizers >"$work/list" 2>"$work/err" ||
    { cat "$work/err"; fail "the installed qlora does not start without LD_LIBRARY_PATH"; }
for q in nf4 fp4 int8; do
    grep -q "^$q " "$work/list" || { cat "$work/list"; fail "installed qlora quantizers does not list $q"; }
    grep -qF "$plugins/qlora_$q.so" "$work/list" || { cat "$work/list"; fail "$q is not the installed plugin"; }
done
if grep -qF "$build" "$work/list"; then cat "$work/list"; fail "installed qlora quantizers names the build tree"; fi

# the folders it searches: the installed one, not the build tree
if run "$qlora" quantize --quiet -q no_such_plugin "$model" -o "$work/never" 2>"$work/err"; then
    fail "quantize with an unknown plugin succeeded"
fi
grep -qF "$plugins" "$work/err" || { cat "$work/err"; fail "the search path lacks the installed plugin folder"; }
if grep -qF "$build" "$work/err"; then cat "$work/err"; fail "the installed qlora searches the build tree"; fi
# (debug information names the folder it was compiled in, as it should: only
# what the program itself reads counts, so the check looks at a copy without it)
for f in "$qlora" "$libdir"/libqlora.so.* "$plugins"/*.so; do
    objcopy --strip-debug "$f" "$work/nodebug" || fail "objcopy --strip-debug $f failed"
    if grep -qaF "$build" "$work/nodebug"; then fail "$f holds the build tree's path $build"; fi
done

# the example plugin, built against the installed header and qlora.pc only:
# first as the Makefile says, given nothing but the prefix
cp -r "$root/examples/rtn-int4" "$work/src"
env -u PKG_CONFIG_PATH -u PKG_CONFIG_LIBDIR make -C "$work/src" QLORA_PREFIX="$work/d$QLORA_INSTALL_PREFIX" \
    >"$work/make.log" 2>&1 || { cat "$work/make.log"; fail "make QLORA_PREFIX=<the staged prefix> failed"; }
grep -qF -- "--define-variable=prefix=$work/d$QLORA_INSTALL_PREFIX" "$work/make.log" ||
    { cat "$work/make.log"; fail "make QLORA_PREFIX did not take the staged prefix"; }
# then through PKG_CONFIG_PATH=<prefix>/<libdir>/pkgconfig, the folder the docs name
export PKG_CONFIG_PATH="$libdir/pkgconfig" PKG_CONFIG_SYSROOT_DIR="$work/d"
pkg-config --exists qlora || fail "pkg-config does not find the installed qlora.pc in $libdir/pkgconfig"
case " $(pkg-config --cflags qlora) " in
*" -I$work/d"*) ;;
*) fail "pkg-config --cflags qlora is '$(pkg-config --cflags qlora)', not the installed headers" ;;
esac
make -s -C "$work/src" clean all >"$work/make.log" 2>&1 ||
    { cat "$work/make.log"; fail "examples/rtn-int4 does not build against the install"; }
so="$work/src/rtn_int4.so"
[ -f "$so" ] || fail "$so was not built"
run "$qlora" quantize --quiet --quantizer="$so:group_size=64" "$model" -o "$work/out" >/dev/null 2>"$work/err" ||
    { cat "$work/err"; fail "the installed qlora cannot quantize with the example plugin"; }
QLORA_PLUGIN_PATH="$work/src" env -u LD_LIBRARY_PATH "$qlora" inspect "$work/out/model.safetensors" >"$work/inspect"
grep -q " rtn_int4 " "$work/inspect" || { cat "$work/inspect"; fail "installed inspect does not name rtn_int4"; }
echo "installed into a staging prefix; qlora starts, finds its plugins, and the example builds: ok"
