#!/bin/sh
# PID 1 of a `cargo xtask kernels` guest (xtask/src/kernels.rs), started by the initramfs
# (xtask/kernels-initramfs.sh) on the host's root, which is shared read-only over 9p.
# It makes the writable places the tests need, checks that the agent loads and attaches
# its programs on this kernel, runs the demo's capture scenario (xtask/demo.sh) and the
# test binaries as root, prints `MESH-KERNELS-*` lines the host parses, and powers the
# guest off whatever happens.
#
# $MESH_KRUN (a boot parameter) is the host's run folder: `env` sets MESH_RELEASE,
# MESH_MODULES (the unpacked kernel package), MESH_TEST_BINS (the test binaries' folder),
# MESH_TEST_NAMES (which of them run, in order), MESH_TEST_CWD, MESH_TEST_THREADS,
# MESH_GUEST_TIMEOUT, MESH_DEMO (1: run the demo), PODTOOL and MESH_AGENT_BIN; `test-args`
# holds the test binaries' extra arguments, one per line.

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp LANG=C.UTF-8 RUST_BACKTRACE=0

off() {
    sync
    # busybox (busybox-static) powers off at once, from PID 1; sysrq is the fallback. PID 1
    # must not exit meanwhile (that panics), and the 9p root may be gone: shell builtins only.
    /bin/busybox poweroff -f
    echo o >/proc/sysrq-trigger
    while :; do
        read -r _ </dev/console
    done
}

result() {
    echo "MESH-KERNELS-RESULT $*"
}

mount_all() {
    mount -t proc proc /proc || return 1
    mount -t sysfs sys /sys || return 1
    mount -t devtmpfs dev /dev || return 1
    mkdir -p /dev/pts /dev/shm
    mount -t devpts devpts /dev/pts
    mount -t tmpfs tmpfs /dev/shm
    # The repository (this script's, the binaries' and the run folder's) may itself live
    # under /tmp, as a CI clone does: keep it visible through the guest's tmpfs there.
    repo=$(dirname "$(dirname "$0")")
    case "$repo" in
    /tmp/*)
        mkdir -p /dev/.mesh-repo
        mount --bind "$repo" /dev/.mesh-repo || return 1
        ;;
    esac
    mount -t tmpfs -o mode=1777 tmpfs /tmp || return 1
    case "$repo" in
    /tmp/*)
        mkdir -p "$repo"
        mount --bind /dev/.mesh-repo "$repo" || return 1
        ;;
    esac
    mount -t tmpfs -o mode=755 tmpfs /run || return 1
    mount -t bpf bpf /sys/fs/bpf || return 1
    mount -t cgroup2 cgroup2 /sys/fs/cgroup || return 1
    # The guest kernel's modules (veth, bridge, sch_ingress, nf_tables...) load on demand
    # as on a real node, from the unpacked package (xtask/kernels-modprobe.sh).
    mkdir -p /run/mesh-kernels
    echo "$MESH_MODULES" >/run/mesh-kernels/modules-root
    echo "$(dirname "$0")/kernels-modprobe.sh" >/proc/sys/kernel/modprobe || return 1
    hostname mesh-kernels
    ip link set lo up || return 1
}

# Start the agent alone with one empty namespace and list what it loaded and attached.
probe() {
    pin=/sys/fs/bpf/mesh-kprobe cg=/sys/fs/cgroup/mesh-kprobe dir=/tmp/mesh-kprobe
    mkdir -p "$cg" "$dir"
    printf 'namespaces:\n  - name: probe\n' >"$dir/mesh.yaml"
    MESH_LOG=info "$MESH_AGENT_BIN" run --config "$dir/mesh.yaml" --pin-path "$pin" \
        --cgroup "$cg" --proxy-address 127.0.0.1:15001 --admin-address 127.0.0.1:15020 \
        --xds-listen 127.0.0.1:15010 >"$dir/agent.log" 2>&1 &
    pid=$!
    ready=0 i=0
    while [ $i -lt 300 ]; do
        if curl -fsS -o /dev/null --max-time 5 http://127.0.0.1:15020/ready 2>/dev/null; then
            ready=1
            break
        fi
        kill -0 $pid 2>/dev/null || break
        sleep 0.5
        i=$((i + 1))
    done
    echo "MESH-KERNELS-PROGRAMS $("$MESH_AGENT_BIN" programs --pin-path "$pin" -o json 2>&1 | tr -d '\n')"
    echo "MESH-KERNELS-LINKS $("$MESH_AGENT_BIN" links --pin-path "$pin" -o json 2>&1 | tr -d '\n')"
    kill -TERM $pid 2>/dev/null
    wait $pid
    status=$?
    sed 's/^/agent| /' "$dir/agent.log"
    echo "MESH-KERNELS-PROBE ready=$ready agent_exit=$status"
    rmdir "$cg" 2>/dev/null
}

# The demo on a simulated node in this guest (xtask/demo.sh, as `cargo xtask demo` runs
# it): its output prefixed `demo| ` for the host to check (capture, bytes, firewall).
demo() {
    [ "$MESH_DEMO" = 1 ] || return 0
    dstart=$(date +%s)
    # POSIX sh has no PIPESTATUS: the demo's status goes through a file.
    {
        timeout -k 10 600 bash "$(dirname "$0")/demo.sh" 2>&1
        echo $? >/tmp/mesh-demo.rc
    } | sed 's/^/demo| /'
    rc=$(cat /tmp/mesh-demo.rc 2>/dev/null || echo "?")
    echo "MESH-KERNELS-DEMO rc=$rc secs=$(($(date +%s) - dstart))"
}

run_tests() {
    set --
    while IFS= read -r a; do
        set -- "$@" "$a"
    done <"$MESH_KRUN/test-args"
    cd "$MESH_TEST_CWD" || return 1
    worst=0
    for name in $MESH_TEST_NAMES; do
        bin=$MESH_TEST_BINS/$name
        echo "MESH-KERNELS-TESTS name=$name $bin --test-threads=$MESH_TEST_THREADS $*"
        bstart=$(date +%s)
        left=$((deadline - bstart))
        if [ $left -lt 30 ]; then
            echo "MESH-KERNELS-BIN name=$name rc=124 secs=0 skipped=timeout"
            [ $worst -eq 0 ] && worst=124
            continue
        fi
        timeout -k 10 "$left" "$bin" --test-threads="$MESH_TEST_THREADS" \
            --color=never "$@" 2>&1
        rc=$?
        # A binary stopped by `timeout` leaves its last line unfinished.
        echo
        echo "MESH-KERNELS-BIN name=$name rc=$rc secs=$(($(date +%s) - bstart))"
        [ $rc -ne 0 ] && [ $worst -eq 0 ] && worst=$rc
    done
    return $worst
}

main() {
    if ! . "$MESH_KRUN/env"; then
        result "stage=env rc=1"
        return
    fi
    if ! mount_all; then
        result "stage=mount rc=1 release=$(uname -r)"
        return
    fi
    if [ "$(uname -r)" != "$MESH_RELEASE" ]; then
        result "stage=release rc=1 release=$(uname -r) expected=$MESH_RELEASE"
        return
    fi
    # The thousand-connection test holds more than the default 1,024 descriptors.
    ulimit -n 65536
    # One time budget for the demo and the test binaries, so the guest reports before the
    # host's limit.
    deadline=$(($(date +%s) + MESH_GUEST_TIMEOUT))
    probe
    demo
    start=$(date +%s)
    run_tests
    rc=$?
    result "stage=tests rc=$rc release=$(uname -r) secs=$(($(date +%s) - start))"
}

main
off
