#!/bin/sh
# Builds the waiter binaries from their source with GNU as, gcc and ld, deterministically (no
# build id, no timestamps, no symbols, no compiler ident), so that the committed binary can
# be checked against its source: tests/test_waiter.py runs this and compares the bytes.
#   proxy/waiter/build.sh [OUTDIR]    (default: beside this script, proxy/waiter/ARCH/)
# Users need no toolchain: the built binary is committed and shipped as package data (and as
# bin/pyproxy-door). The committed one was built with GNU binutils 2.40 and gcc 12.2.0
# (Debian 12); other versions may lay the file out differently: then rebuild, check the
# tests, and commit both (tests/test_waiter.py reads the two versions below).
#   BINUTILS_VERSION=2.40
#   GCC_VERSION=12.2.0
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out/x86_64"
# -mx86-used-note=no: no .note.gnu.property (some distributions' as add one by default).
as --64 -mx86-used-note=no -o "$work/waiter.o" "$here/waiter_x86_64.s"
# The front door (pyproxy-door), freestanding C: no libc, no stack protector or unwind
# tables, no ident, no CET note, not position-independent (a static executable), and no
# library calls made up by the optimiser (it has none to call).
gcc -c -m64 -Os -ffreestanding -nostdlib -static -fno-stack-protector -fno-asynchronous-unwind-tables \
    -fno-unwind-tables -fno-ident -fcf-protection=none -fno-pie -fno-pic \
    -fno-tree-loop-distribute-patterns -fno-stack-clash-protection \
    -o "$work/door.o" "$here/door_x86_64.c"
# -static -nostdlib: no libc, no ld.so; -z noseparate-code: code and constants in one
# read-only executable segment (fewer mappings, one page); -s: no symbol table. The waiter's
# object first: its _start and code open the file, the door's follow.
ld -m elf_x86_64 -static -nostdlib --build-id=none -z noexecstack -z noseparate-code -s \
    -o "$work/pyproxy-wait" "$work/waiter.o" "$work/door.o"
chmod 0755 "$work/pyproxy-wait"
mv "$work/pyproxy-wait" "$out/x86_64/pyproxy-wait"
