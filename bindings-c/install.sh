#!/usr/bin/env bash
# Installs the fmi C library: PREFIX/include/fmi.h, PREFIX/lib/libfmi.{so,a} and
# PREFIX/lib/pkgconfig/fmi.pc (from fmi.pc.in).
#
#   bindings-c/install.sh [PREFIX]                  # cargo build --release -p fmi-c, then install
#   FMI_LIB_DIR=DIR bindings-c/install.sh PREFIX    # install libraries already built in DIR
#
# PREFIX defaults to /usr/local. Then: cc prog.c $(pkg-config --cflags --libs fmi), with
# PKG_CONFIG_PATH=PREFIX/lib/pkgconfig if PREFIX is not a system prefix.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
prefix=${1:-/usr/local}

if [ -n "${FMI_LIB_DIR:-}" ]; then
    lib_dir=$FMI_LIB_DIR
else
    (cd "$root" && cargo build --release -p fmi-c)
    lib_dir="${CARGO_TARGET_DIR:-$root/target}/release"
fi
for f in libfmi.so libfmi.a; do
    [ -f "$lib_dir/$f" ] || { echo "install.sh: $lib_dir/$f not found; build with cargo build --release -p fmi-c" >&2; exit 1; }
done
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)

install -d "$prefix/include" "$prefix/lib/pkgconfig"
install -m 644 "$here/include/fmi.h" "$prefix/include/fmi.h"
install -m 755 "$lib_dir/libfmi.so" "$prefix/lib/libfmi.so"
install -m 644 "$lib_dir/libfmi.a" "$prefix/lib/libfmi.a"
# A build with the `rdma` feature (the test suite's feature selection enables it across the
# workspace) calls libfabric: static users must link it too.
libs_extra=""
if grep -q -a "fi_getinfo" "$lib_dir/libfmi.a"; then
    libs_extra=" -lfabric"
fi
sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" -e "s|@LIBS_EXTRA@|$libs_extra|g" "$here/fmi.pc.in" >"$prefix/lib/pkgconfig/fmi.pc"
echo "installed fmi $version under $prefix"
