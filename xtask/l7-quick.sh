#!/usr/bin/env bash
# Quick HTTP/1.1 measurement on a simulated node (issue 3's closing-note figure; the full
# L7 suite is `cargo xtask bench l7`, issue 5): wrk, 8 keep-alive connections, 1 thread,
# for N runs of S seconds each, against podtool's HTTP server:
#   direct: an opted-out pod -> the server pod
#   L4:     an enrolled pod -> the server pod's address (captured, plain relay)
#   L7:     an enrolled pod -> the service address (captured, routed by the L7 engine)
# Everything pinned to CPU 0 (one-vCPU placement). Prints requests/s and p50/p99 medians.
# Usage (root): MESH_AGENT_BIN=... PODTOOL=... xtask/l7-quick.sh [RUNS] [SECS]
set -euo pipefail
RUNS=${1:-5}; SECS=${2:-5}
AGENT=${MESH_AGENT_BIN:?}; PODTOOL=${PODTOOL:?}
command -v wrk > /dev/null || { echo "wrk missing: apt-get install wrk" >&2; exit 1; }
CG_ROOT=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
CG=$CG_ROOT/mesh-l7q; PIN=/sys/fs/bpf/mesh-l7q; DIR=/tmp/mesh-l7q; BR=ml7qbr; ADMIN=127.0.0.1:15095
AGENT_PID=
cleanup() {
  trap "" INT TERM; exec 2>/dev/null; trap - EXIT
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" && wait "$AGENT_PID" || true
  for d in "$CG"/*/ "$CG/"; do [ -f "$d/cgroup.procs" ] && xargs -r kill -9 < "$d/cgroup.procs" || true; done
  sleep 0.2
  for p in cli opt srv; do ip netns del "ml7q-$p" || true; rmdir "$CG/$p" || true; done
  ip link del "$BR" || true; rmdir "$CG" || true; rm -rf "$DIR"
}
trap cleanup EXIT INT TERM
in_pod() { local pod=$1; shift; sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$CG/$pod" ip netns exec "ml7q-$pod" "$@"; }
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mkdir -p "$DIR" "$CG"
ip link add "$BR" type bridge; ip addr add 10.205.0.1/24 dev "$BR"; ip link set "$BR" up
for p in cli:2 opt:3 srv:4; do
  n=${p%%:*}; h=${p##*:}
  ip netns add "ml7q-$n"; ip link add "ml7q$h" type veth peer name eth0 netns "ml7q-$n"
  ip link set "ml7q$h" master "$BR" up; ip -n "ml7q-$n" addr add "10.205.0.$h/24" dev eth0
  ip -n "ml7q-$n" link set eth0 up; ip -n "ml7q-$n" link set lo up; mkdir -p "$CG/$n"
done
( in_pod srv taskset -c 0 "$PODTOOL" http --listen 0.0.0.0:8080 --name srv > /dev/null 2>&1 & )
cat > "$DIR/mesh.yaml" <<YAML
namespaces:
  - { name: a, labels: { mesh-agent.io/dataplane-mode: ambient } }
  - { name: b }
workloads:
  - { name: cli, namespace: a, ip: 10.205.0.2, netns: /run/netns/ml7q-cli }
  - { name: opt, namespace: a, ip: 10.205.0.3, netns: /run/netns/ml7q-opt, labels: { mesh-agent.io/dataplane-mode: none } }
  - { name: srv, namespace: b, ip: 10.205.0.4, netns: /run/netns/ml7q-srv, labels: { app: srv } }
services:
  - { name: srv, namespace: b, vip: 10.96.0.10, ports: [ { port: 80, target_port: 8080, protocol: http } ], selector: { app: srv } }
YAML
sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$CG" taskset -c 0 "$AGENT" run --config "$DIR/mesh.yaml" \
  --pin-path "$PIN" --cgroup "$CG" --proxy-address 10.205.0.1:15001 --admin-address "$ADMIN" --xds-listen 127.0.0.1:15094 2> "$DIR/agent.log" &
AGENT_PID=$!
for _ in $(seq 100); do curl -sf "http://$ADMIN/ready" > /dev/null 2>&1 && break; sleep 0.1; done
curl -sf "http://$ADMIN/ready" > /dev/null || { cat "$DIR/agent.log"; exit 1; }
measure() { # measure LABEL POD URL
  local rps=() p50=() p99=()
  in_pod "$2" wrk -t1 -c8 -d1s "$3" > /dev/null   # warm-up (and on-demand subscription)
  for _ in $(seq "$RUNS"); do
    local out; out=$(in_pod "$2" taskset -c 0 wrk -t1 -c8 -d"${SECS}s" --latency "$3")
    rps+=("$(echo "$out" | awk '/Requests\/sec/ {print $2}')")
    p50+=("$(echo "$out" | awk '$1 == "50%" {print $2}')")
    p99+=("$(echo "$out" | awk '$1 == "99%" {print $2}')")
    if echo "$out" | grep -q "Non-2xx\|Socket errors"; then echo "$out" >&2; fi
  done
  med() { printf '%s\n' "$@" | sort -g | awk -v n="$#" 'NR == int((n+1)/2)'; }
  printf '%-44s rps %9s (runs: %s)  p50 %7s  p99 %7s\n' "$1" "$(med "${rps[@]}")" "$(printf '%s ' "${rps[@]}")" "$(med "${p50[@]}")" "$(med "${p99[@]}")"
}
measure "direct (opted-out pod -> pod)" opt http://10.205.0.4:8080/
measure "mesh L4 (captured, plain relay)" cli http://10.205.0.4:8080/
measure "mesh L7 (captured, service route)" cli http://10.96.0.10/
