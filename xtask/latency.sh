#!/usr/bin/env bash
# Quick pod -> pod TCP round-trip latency (64-byte ping-pong) on a simulated node:
# direct (not enrolled), mesh proxied with sk_msg on the app leg, on both legs, without
# sk_msg, and
# direct mode (sk_msg socket to socket). Client, server and agent are pinned to CPU 0
# (cross-vCPU wake-ups dominate otherwise on these VMs). Prints the median p50 of N runs.
# Run with `cargo xtask latency [--runs N]` as root. Not a benchmark suite: see issue 5.
set -euo pipefail
RUNS=${1:-5}
AGENT=${MESH_AGENT_BIN:?}; PODTOOL=${PODTOOL:?}
CG_ROOT=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
CG=$CG_ROOT/mesh-lat; PIN=/sys/fs/bpf/mesh-lat; DIR=/tmp/mesh-lat; BR=mlatbr; ADMIN=127.0.0.1:15098
AGENT_PID=
cleanup() {
  trap "" INT TERM
  exec 2>/dev/null  # job-control noise ("Killed") from the pods we stop
  trap - EXIT
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null || true
  for d in "$CG"/*/ "$CG/"; do [ -f "$d/cgroup.procs" ] && xargs -r kill -9 < "$d/cgroup.procs" 2>/dev/null || true; done
  sleep 0.2
  for p in cli srv; do ip netns del "mlat-$p" 2>/dev/null || true; rmdir "$CG/$p" 2>/dev/null || true; done
  ip link del "$BR" 2>/dev/null || true; rmdir "$CG" 2>/dev/null || true; rm -rf "$DIR"
}
trap cleanup EXIT INT TERM
in_pod() { local pod=$1; shift; sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$CG/$pod" ip netns exec "mlat-$pod" "$@"; }
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mkdir -p "$DIR" "$CG"
ip link add "$BR" type bridge; ip addr add 10.203.0.1/24 dev "$BR"; ip link set "$BR" up
for p in cli:2 srv:3; do
  n=${p%%:*}; h=${p##*:}
  ip netns add "mlat-$n"; ip link add "mlat$h" type veth peer name eth0 netns "mlat-$n"
  ip link set "mlat$h" master "$BR" up; ip -n "mlat-$n" addr add "10.203.0.$h/24" dev eth0
  ip -n "mlat-$n" link set eth0 up; ip -n "mlat-$n" link set lo up; mkdir -p "$CG/$n"
done
# In a subshell so bash does not report the server's end as a killed job.
( in_pod srv taskset -c 0 "$PODTOOL" echo --listen 0.0.0.0:8080 > /dev/null 2>&1 & )
sleep 0.3
config() { # config ENROLLED(0/1) MODE
  local label="{}"; [ "$1" = 1 ] && label="{ mesh-agent.io/dataplane-mode: ambient }"
  printf 'namespaces:\n  - { name: a, labels: %s }\n  - { name: b, mode: %s }\nworkloads:\n  - { name: cli, namespace: a, ip: 10.203.0.2, netns: /run/netns/mlat-cli }\n  - { name: srv, namespace: b, ip: 10.203.0.3, netns: /run/netns/mlat-srv }\n' "$label" "$2" > "$DIR/mesh.yaml"
}
start_agent() {
  sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$CG" taskset -c 0 "$AGENT" run --config "$DIR/mesh.yaml" \
    --pin-path "$PIN" --cgroup "$CG" --proxy-address 10.203.0.1:15001 --admin-address "$ADMIN" --xds-listen 127.0.0.1:15097 "$@" 2> "$DIR/agent.log" &
  AGENT_PID=$!
  for _ in $(seq 100); do curl -sf "http://$ADMIN/ready" > /dev/null 2>&1 && return; sleep 0.1; done
  cat "$DIR/agent.log"; exit 1
}
stop_agent() { kill "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true; AGENT_PID=; }
measure() { # measure LABEL -> median p50 over RUNS runs
  local vals=()
  for _ in $(seq "$RUNS"); do
    vals+=("$(in_pod cli taskset -c 0 "$PODTOOL" ping --to 10.203.0.3:8080 --count 5000 | sed 's/.*"p50_us":\([0-9.]*\).*/\1/')")
  done
  local sorted; sorted=$(printf '%s\n' "${vals[@]}" | sort -n)
  printf '%-36s p50 median %7.1f us  (runs: %s)\n' "$1" "$(echo "$sorted" | awk -v n="$RUNS" 'NR == int((n+1)/2)')" "$(echo "$sorted" | paste -sd' ')"
}
config 0 proxied; start_agent; measure "direct (not enrolled)"; stop_agent
config 1 proxied; start_agent; measure "mesh, node proxy, sk_msg"; stop_agent
config 1 proxied; start_agent --skmsg-upstream true; measure "mesh, node proxy, sk_msg both legs"; stop_agent
config 1 proxied; start_agent --skmsg false; measure "mesh, node proxy, no sk_msg"; stop_agent
config 1 direct; start_agent; measure "mesh, direct mode (sk_msg s2s)"; stop_agent
