#!/bin/sh
# kernel.modprobe (/proc/sys/kernel/modprobe) in a `cargo xtask kernels` guest: the shared
# host root has no modules of the guest's kernel where modprobe looks, and it is read-only,
# so module requests (the kernel's autoloading, iptables) go to the unpacked package tree
# that xtask/kernels-init.sh names in /run/mesh-kernels/modules-root.
exec /sbin/modprobe -d "$(cat /run/mesh-kernels/modules-root)" "$@"
