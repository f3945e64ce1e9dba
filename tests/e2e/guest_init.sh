#!/bin/sh
# The e2e guest program (busybox sh).  It runs as /init of the test initramfs and, for the boot
# scenario, a second time as /sbin/init of the root filesystem on the NBD disk.
#
# The kernel command line picks the work: e2e.scenario=boot|attach|connect, e2e.port=PORT,
# e2e.export=NAME, e2e.format=FMT.  Everything is reported on the console as lines the host parses:
#   E2E-BOOTED               the modules loaded (the kernel and the initramfs work)
#   E2E-STEP <name> t=<s>    a check passed (t: the guest's uptime)
#   E2E-INFO <key>=<value>   a measurement the host judges (checksums of raw ranges, sizes)
#   E2E-FAIL <reason>        the scenario failed; the VM powers off at once
#   E2E-OK <scenario>        the scenario finished
# The guest judges what it can know by itself (file checksums against the seeded manifest or
# the data it wrote); the host judges the rest from the INFO lines and the image.
#
# Written data comes from /data/r.bin, 8 MiB of random bytes the host put in the initramfs
# (the host knows them, so it checks the image byte for byte; random data makes every block
# different, so a misplaced block changes the checksums).

# busybox sh runs its own applets before PATH: call the Debian binaries by full path.
PATH=/sbin:/bin
export PATH
DATA=/data/r.bin

say() { echo "E2E-$*"; }
step() {
    read -r up _ </proc/uptime
    say "STEP $1 t=$up"
}
fail() {
    say "FAIL $*"
    sync
    poweroff -f
    exit 1
}
mib() { echo $(($1 * 1048576)); }

params() {
    for w in $(cat /proc/cmdline); do
        case "$w" in
        e2e.scenario=*) E2E_SCENARIO=${w#*=} ;;
        e2e.port=*) E2E_PORT=${w#*=} ;;
        e2e.export=*) E2E_EXPORT=${w#*=} ;;
        e2e.format=*) E2E_FORMAT=${w#*=} ;;
        esac
    done
}

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

sum() { sha256sum | cut -d' ' -f1; }

# data_slice SKIP COUNT: COUNT MiB of the data file starting at SKIP MiB, on stdout.
data_slice() { dd if=$DATA bs=1M skip="$1" count="$2" 2>/dev/null; }

# write_file FILE SKIP COUNT: write a data slice to FILE, flush it, drop the caches, read the
# file back from the disk and compare.
write_file() {
    want=$(data_slice "$2" "$3" | sum)
    data_slice "$2" "$3" >"$1" || fail "write $1"
    drop_caches
    got=$(sum <"$1") || fail "read back $1"
    [ "$got" = "$want" ] || fail "write-verify $1: read back $got, wrote $want"
    say "INFO sha256:$1=$got"
}

load_modules() {
    while read -r m args; do
        insmod "/lib/modules/$m" $args || fail "insmod $m"
    done </lib/modules/load-order
}

# ---- boot: root filesystem on /dev/vda, which QEMU's own NBD client provides ----------------

boot_stage1() {
    [ -b /dev/vda ] || fail "no /dev/vda (virtio disk from the NBD export)"
    mount -t ext4 /dev/vda /newroot || fail "mount /dev/vda"
    # The data file survives switch_root on a tmpfs moved under the new root.
    mount -t tmpfs data /newroot/mnt || fail "tmpfs"
    cp $DATA /newroot/mnt/ || fail "copy data"
    umount /proc /sys
    mount -o move /dev /newroot/dev || fail "move /dev"
    exec switch_root /newroot /sbin/init stage2
}

boot_stage2() {
    DATA=/mnt/r.bin
    mount -t proc proc /proc
    mount -t sysfs sys /sys
    set -- $(grep ' / ' /proc/mounts | tail -n 1)
    [ "$1" = /dev/vda ] || fail "root is $1, not /dev/vda"
    step root-on-vda
    (cd /seed && sha256sum -c -s SHA256SUMS) || fail "seed-verify: seeded files differ from SHA256SUMS"
    step seed-ok
    mkdir -p /e2e
    write_file /e2e/written.bin 0 3
    step write-ok
    umount /mnt
    mount -o remount,ro / || fail "remount / read-only"
    sync
    say "OK boot"
}

# ---- attach: the Linux NBD client (nbd.ko + nbd-client) -------------------------------------

# Device layout (64 MiB export): ext4 in [0, 40M); the data file in [40M, 48M) and again in
# [48M, 56M), which is then discarded; [56M, 64M) is never written.  (The discarded range is
# aligned to 8 MiB: a driver may free only whole clusters or blocks.)
TAIL=40
TRIM=48

connect() {
    /sbin/nbd-client 10.0.2.2 "$E2E_PORT" /dev/nbd0 -N "$E2E_EXPORT" "$@" || fail "nbd-client $* failed"
    say "INFO size=$(blockdev --getsize64 /dev/nbd0)"
}

disconnect() {
    /sbin/nbd-client -d /dev/nbd0 || fail "nbd-client -d"
}

range_sum() { dd if=/dev/nbd0 bs=1M skip="$1" count="$2" 2>/dev/null | sum; }

attach_pass1() {
    connect
    step connected-1
    /sbin/mke2fs -q -t ext4 -F /dev/nbd0 ${TAIL}M || fail "mke2fs on /dev/nbd0"
    mount -t ext4 /dev/nbd0 /mnt || fail "mount /dev/nbd0"
    write_file /mnt/one.bin 0 2
    one=$got
    mkdir -p /mnt/dir
    for i in 1 2 3 4 5 6 7 8; do
        dd if=$DATA of="/mnt/dir/f$i" bs=4097 skip="$i" count="$i" 2>/dev/null || fail "write dir/f$i"
    done
    (cd /mnt/dir && sha256sum f* >../dir.sums) || fail "sum dir"
    drop_caches
    (cd /mnt/dir && sha256sum -c -s ../dir.sums) || fail "small-files-verify"
    umount /mnt || fail "umount 1"
    step fs-1-ok
    for at in $TAIL $TRIM; do
        dd if=$DATA of=/dev/nbd0 bs=1M seek="$at" conv=fsync 2>/dev/null || fail "write data at ${at}M"
    done
    blkdiscard -o "$(mib $TRIM)" -l "$(mib 8)" /dev/nbd0 || fail "blkdiscard"
    drop_caches
    say "INFO tail-kept=$(range_sum $TAIL 8)"
    say "INFO tail-trimmed=$(range_sum $TRIM 8)"
    disconnect
    step pass-1-ok
}

attach_pass2() {
    connect -C 2
    step connected-2
    mount -t ext4 /dev/nbd0 /mnt || fail "mount /dev/nbd0 (pass 2)"
    [ "$(sum </mnt/one.bin)" = "$one" ] || fail "pass-1 file one.bin changed"
    (cd /mnt/dir && sha256sum -c -s ../dir.sums) || fail "pass-1 small files changed"
    write_file /mnt/two.bin 2 1
    rm /mnt/dir/f8 || fail "rm"
    fstrim /mnt || fail "fstrim"
    umount /mnt || fail "umount 2"
    disconnect
    step pass-2-ok
    say "OK attach"
}

# ---- connect: nbdserve itself attaches an image to the kernel (qemu-nbd -c / -d) ------------

# /dev/vda: a read-only root holding Python and nbdserve (chroot /py); /dev/vdb: an ext4
# filesystem holding disk.IMG_FORMAT (mounted at /py/data).  The image holds an ext4 filesystem
# with the seeded files; nbdserve -c puts it on /dev/nbd0, the guest mounts it, checks the seed,
# writes a file, unmounts, and nbdserve -d disconnects it, which ends the server.
py() {
    chroot /py /usr/bin/python3 -m nbdserve "$@"
}

connect_scenario() {
    mount -t ext4 -o ro /dev/vda /py || fail "mount the python disk"
    mount -t ext4 /dev/vdb /py/data || fail "mount the data disk"
    mount -o bind /dev /py/dev && mount -t proc proc /py/proc && mount -t sysfs sys /py/sys \
        && mount -t tmpfs tmp /py/tmp || fail "mounts under /py"
    export PYTHONPATH=/opt/nbdserve PYTHONDONTWRITEBYTECODE=1 NBDSERVE_LOOP=asyncio HOME=/tmp
    # Like qemu-nbd -c: returns once the device is connected, the server stays in the background.
    py -c /dev/nbd0 -f "$E2E_FORMAT" --pid-file /tmp/nbdserve.pid "/data/disk.$E2E_FORMAT" \
        || fail "nbdserve -c /dev/nbd0 failed"
    pid=$(cat /py/tmp/nbdserve.pid) || fail "no pid file"
    say "INFO size=$(blockdev --getsize64 /dev/nbd0)"
    step connected
    mount -t ext4 /dev/nbd0 /mnt || fail "mount /dev/nbd0"
    (cd /mnt/seed && sha256sum -c -s SHA256SUMS) || fail "seed-verify: seeded files differ from SHA256SUMS"
    step seed-ok
    mkdir -p /mnt/e2e
    write_file /mnt/e2e/written.bin 0 3
    umount /mnt || fail "umount /mnt"
    step fs-ok
    py -d /dev/nbd0 || fail "nbdserve -d /dev/nbd0 failed"
    # The server ends once the kernel lets go of the device (bounded wait for its exit).
    n=0
    while [ -d "/proc/$pid" ] && [ $n -lt 600 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    [ -d "/proc/$pid" ] && fail "the server did not exit after -d"
    [ -e /py/tmp/nbdserve.pid ] && fail "the server left its pid file"
    [ -e /sys/block/nbd0/pid ] && fail "/dev/nbd0 is still connected"
    step disconnected
    umount /py/data || fail "umount the data disk"
    sync
    say "OK connect"
}

# ---- main --------------------------------------------------------------------------------

if [ "$1" = stage2 ]; then
    boot_stage2
    poweroff -f
fi

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# The initramfs has no /dev/console, so the kernel could not open one for us: do it now.
exec </dev/console >/dev/console 2>&1
params
load_modules
say BOOTED
case "$E2E_SCENARIO" in
boot) boot_stage1 ;;
attach)
    ip link set lo up
    ip addr add 10.0.2.15/24 dev eth0 || fail "no eth0"
    ip link set eth0 up || fail "eth0 up"
    attach_pass1
    attach_pass2
    ;;
connect) connect_scenario ;;
*) fail "unknown scenario '$E2E_SCENARIO'" ;;
esac
poweroff -f
