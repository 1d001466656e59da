#!/bin/busybox sh
# /init of the tiny initramfs `cargo xtask kernels` builds (xtask/src/kernels.rs): busybox,
# the guest kernel's own virtio-pci and 9p modules (Debian builds them as modules), and
# this script. It mounts the host's root, shared read-only over virtio-9p, and hands over
# to xtask/kernels-init.sh there. The kernel passes MESH_KINIT and MESH_KRUN (unknown
# `name=value` boot parameters) to init as environment variables.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

fail() {
    echo "MESH-KERNELS-RESULT stage=initramfs rc=1 reason=\"$*\""
    echo o >/proc/sysrq-trigger
    sleep 30
}

# Sorted by name: the host numbered them in dependency order (modprobe --show-depends).
for m in /modules/*.ko; do
    [ -e "$m" ] || continue
    insmod "$m" || fail "insmod $m failed"
done

# cache=loose: the shared tree does not change under a run (the binaries under test are
# private copies), and executables run faster from the page cache.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /newroot ||
    fail "mounting the host root over virtio-9p failed"
[ -r "/newroot$MESH_KINIT" ] || fail "no $MESH_KINIT in the shared root"

umount /dev /sys /proc
exec switch_root /newroot /bin/sh "$MESH_KINIT"
