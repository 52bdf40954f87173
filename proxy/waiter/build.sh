#!/bin/sh
# Builds the waiter binaries from their source with GNU as and ld, deterministically (no
# build id, no timestamps, no symbols), so that the committed binary can be checked against
# its source: tests/test_waiter.py runs this and compares the bytes.
#   proxy/waiter/build.sh [OUTDIR]    (default: beside this script, proxy/waiter/ARCH/)
# Users need no toolchain: the built binary is committed and shipped as package data. The
# committed one was built with GNU binutils 2.40 (Debian 12); another version may lay the
# file out differently: then rebuild, check the tests, and commit both.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out/x86_64"
# -mx86-used-note=no: no .note.gnu.property (some distributions' as add one by default).
as --64 -mx86-used-note=no -o "$work/waiter.o" "$here/waiter_x86_64.s"
# -static -nostdlib: no libc, no ld.so; -z noseparate-code: code and constants in one
# read-only executable segment (fewer mappings, one page); -s: no symbol table.
ld -m elf_x86_64 -static -nostdlib --build-id=none -z noexecstack -z noseparate-code -s \
    -o "$work/pyproxy-wait" "$work/waiter.o"
chmod 0755 "$work/pyproxy-wait"
mv "$work/pyproxy-wait" "$out/x86_64/pyproxy-wait"
