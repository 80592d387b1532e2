#!/bin/bash
# Reference run of the whole guest contract under QEMU microvm (pcie=on).
# Usage: tests/guest/check-qemu.sh        Needs qemu-system-x86_64, qemu-img, /dev/kvm.
# Prints one line per check and a closing "N passed, N failed"; exits non-zero on failure.
set -u
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
elf=$("$here/build.sh") || exit 1
export GUEST_ELF=$elf
rustc --edition 2021 -O "$here/pattern-check.rs" -o "$work/pattern-check" || exit 1
rustc --edition 2021 --test "$here/pattern.rs" -o "$work/pattern-test" || exit 1
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "PASS $1"; }
ko() { fail=$((fail + 1)); echo "FAIL $1"; sed 's/^/    /' "$work/out" | tail -20; }

# check NAME WANT_RC GREP_PATTERN TEST_ARGS [env...]: run, compare exit code, grep output.
check() {
    local name=$1 want=$2 pat=$3 args=$4
    shift 4
    env "$@" timeout 60 "$here/run-qemu.sh" "$args" >"$work/out" 2>&1 </dev/null
    local rc=$?
    if [ "$rc" = "$want" ] && grep -Eq "$pat" "$work/out" &&
        head -1 "$work/out" | grep -Eq '^vireo-guest: boot cpus=[0-9]+ mem_mib=[0-9]+$'; then
        ok "$name"
    else
        echo "    (exit $rc, want $want; pattern '$pat')"
        ko "$name"
    fi
}

if "$work/pattern-test" >"$work/out" 2>&1; then ok "pattern.rs unit tests"; else ko "pattern.rs unit tests"; fi

check boot 0 '^vireo-guest: result ok$' "test=boot"
check boot-smp2-mem512 0 'boot cpus=2 mem_mib=512' "test=boot" QEMU_SMP=2 QEMU_MEM=512
check mem-6g 0 '^mem ram 0x100000000\.\.0x1c0000000 ok$' "test=mem" QEMU_MEM=6144
check unknown-test 1 '^vireo-guest: result fail unknown test$' "test=bogus"
check no-test 1 '^vireo-guest: result fail unknown test$' ""

qemu-img create -q -f raw "$work/d.raw" 64M
qemu-img create -q -f vhdx "$work/d.vhdx" 64M
check pci 0 '^pci 00:01\.0 vendor=1af4 device=1001 class=010000$' "test=pci" DISK="$work/d.raw"

for img in d.raw d.vhdx; do
    d=$work/$img
    check "blk-write $img" 0 '^blk capacity=131072 wrote=3000 crc32=' \
        "test=blk-write seed=77 sectors=3000 offset=11" DISK="$d"
    crc=$(sed -n 's/^blk .*crc32=\([0-9a-f]*\)$/\1/p' "$work/out")
    check "blk-read $img" 0 "^blk read=3000 mismatches=0 crc32=$crc\$" \
        "test=blk-read seed=77 sectors=3000 offset=11" DISK="$d"
    check "blk-read $img wrong seed" 1 '^blk read=3000 mismatches=3000 ' \
        "test=blk-read seed=78 sectors=3000 offset=11" DISK="$d"
    check "blk-ro $img" 0 '^blk-ro write=refused .*unchanged=1$' "test=blk-ro" DISK="$d" DISK_RO=1
done
# QEMU microvm's 64-bit window: the top quarter of the (host) physical address space.
pbits=$(sed -n 's/^address sizes[^0-9]*\([0-9]*\) bits physical.*/\1/p' /proc/cpuinfo | head -1)
if [ -n "$pbits" ] && [ "$pbits" -le 48 ]; then
    w64=$(printf '0x%x:0x%x' $((3 << (pbits - 2))) $((1 << (pbits - 2))))
    check "blk-read d.raw, 64-bit BAR in mmio64=$w64" 0 '^blk read=3000 mismatches=0 ' \
        "test=blk-read seed=77 sectors=3000 offset=11 mmio64=$w64" DISK="$work/d.raw"
else
    echo "SKIP 64-bit BAR window check (host physical address bits: ${pbits:-unknown})"
fi
check "blk-ro on a writable disk" 1 'result fail write to read-only disk was accepted' \
    "test=blk-ro" DISK="$work/d.raw"
qemu-img convert -O raw "$work/d.vhdx" "$work/from-vhdx.raw"
for img in d.raw from-vhdx.raw; do
    if "$work/pattern-check" "$work/$img" 77 3000 11 >"$work/out" 2>&1; then
        ok "host pattern check $img"
    else
        ko "host pattern check $img"
    fi
done
if qemu-img check -q "$work/d.vhdx" >"$work/out" 2>&1; then ok "qemu-img check d.vhdx"; else ko "qemu-img check d.vhdx"; fi

check counter 0 '^tick 4 tsc=[0-9]+$' "test=counter period_ms=20 ticks=5"
check dirty 0 '^dirty pass=20 written=2000 ' "test=dirty pages=100 passes=20"
check fault-pf 127 'exception vector=0x0e error=0x0000000000000004 .*cr2=0x0000020000000000' "test=fault kind=pf"
check fault-gp 127 'exception vector=0x0d ' "test=fault kind=gp"
check fault-ud 127 'exception vector=0x06 ' "test=fault kind=ud"
check irq 0 '^irq lapic-timer vector=0x40 delivered=[1-9]' "test=irq"
check msi 0 '^msi vector=0x40 delivered=[1-9]' "test=msi" DISK="$work/d.raw"
qemu-img create -q -f raw "$work/b.raw" 64M
check blk-bench 0 '^bench seq1m-read ops=[1-9]' "test=blk-bench ms=100 span_mib=64" DISK="$work/b.raw"

# Wall time exec -> exit of test=boot (best of 5).
best=
for _ in 1 2 3 4 5; do
    s=$(date +%s%N)
    qemu-system-x86_64 -M microvm,pcie=on -accel kvm -cpu host,-arch-capabilities -m 256 \
        -display none -no-reboot -serial stdio -device isa-debug-exit,iobase=0xf4,iosize=4 \
        -kernel "$elf" -append "test=boot" >/dev/null 2>&1 </dev/null
    ms=$((($(date +%s%N) - s) / 1000000))
    if [ -z "$best" ] || [ "$ms" -lt "$best" ]; then best=$ms; fi
done
echo "INFO test=boot under QEMU microvm,pcie=on: best wall time exec->exit ${best} ms (of 5)"

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
