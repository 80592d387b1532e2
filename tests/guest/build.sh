#!/bin/sh
# Builds the Vireo PVH test guest and prints the path of the ELF.
# Usage: tests/guest/build.sh [--debug]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
profile=release
flag=--release
if [ "${1:-}" = "--debug" ]; then profile=debug; flag=; fi
# --target is explicit so these RUSTFLAGS reach only the guest, never build scripts.
RUSTFLAGS="-C relocation-model=static -C link-arg=-nostartfiles -C link-arg=-static \
-C link-arg=-no-pie -C link-arg=-T$here/linker.ld -C link-arg=-Wl,--build-id=none" \
CARGO_TARGET_DIR="$here/target" \
cargo build --quiet $flag --locked --target x86_64-unknown-linux-gnu -j "${GUEST_BUILD_JOBS:-1}" >&2
echo "$here/target/x86_64-unknown-linux-gnu/$profile/vireo-guest"
