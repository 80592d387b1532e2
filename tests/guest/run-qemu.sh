#!/bin/sh
# Runs the Vireo test guest under QEMU microvm (the reference VMM).
#
# Usage: tests/guest/run-qemu.sh "TEST_ARGS" [extra qemu args...]
#   e.g. tests/guest/run-qemu.sh "test=boot"
#        DISK=/tmp/d.vhdx tests/guest/run-qemu.sh "test=blk-write seed=7 sectors=2048"
#
# Environment:
#   GUEST_ELF    guest ELF (default: build it with build.sh)
#   DISK         attach this image as virtio-blk-pci (drive id d0)
#   DISK_FORMAT  raw | vhdx | qcow2 ... (default: from the file name, else raw)
#   DISK_RO=1    attach it read-only (the device then offers VIRTIO_BLK_F_RO)
#   QEMU_MEM     MiB of RAM (default 256)     QEMU_SMP  vCPUs (default 1)
#   QEMU         qemu binary (default qemu-system-x86_64)
#
# Exit status: the guest's isa-debug-exit code (0 = success); 125 if QEMU stopped without a
# debug-exit write (e.g. triple fault with -no-reboot), or QEMU's own error status.
set -u
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -lt 1 ]; then
    sed -n '2,17p' "$0" >&2
    exit 2
fi
args=$1
shift
elf=${GUEST_ELF:-}
if [ -z "$elf" ]; then
    elf=$("$here/build.sh") || exit 1
fi
set -- -M microvm,pcie=on -accel kvm -cpu host,-arch-capabilities \
    -m "${QEMU_MEM:-256}" -smp "${QEMU_SMP:-1}" \
    -display none -no-reboot -serial stdio \
    -device isa-debug-exit,iobase=0xf4,iosize=4 \
    -kernel "$elf" -append "$args" "$@"
if [ -n "${DISK:-}" ]; then
    fmt=${DISK_FORMAT:-}
    if [ -z "$fmt" ]; then
        case "$DISK" in
            *.vhdx) fmt=vhdx ;; *.qcow2) fmt=qcow2 ;; *) fmt=raw ;;
        esac
    fi
    ro=
    [ "${DISK_RO:-0}" = 1 ] && ro=,readonly=on
    set -- "$@" -drive "file=$DISK,if=none,id=d0,format=$fmt$ro" -device virtio-blk-pci,drive=d0
fi
"${QEMU:-qemu-system-x86_64}" "$@"
rc=$?
if [ $((rc & 1)) -eq 1 ]; then
    exit $((rc >> 1))
elif [ $rc -eq 0 ]; then
    echo "run-qemu.sh: QEMU stopped without a debug-exit write" >&2
    exit 125
fi
exit $rc
