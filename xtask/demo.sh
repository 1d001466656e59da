#!/usr/bin/env bash
# The mesh-agent demo on a simulated node (run it with `cargo xtask demo`, as root).
#
# Node: the host network namespace with bridge mdemobr (10.202.0.1/24) and cgroup
# <cgroup2>/mesh-demo. Pods: network namespaces on the bridge, each with a cgroup folder:
#   shop/web      10.202.0.2  namespace shop is enrolled (label mesh-agent.io/dataplane-mode=ambient)
#   shop/cron     10.202.0.3  opted out (pod label mesh-agent.io/dataplane-mode=none)
#   backend/api   10.202.0.4  echo server on :8080 (namespace backend: proxied)
#   cache/redis   10.202.0.5  echo server on :6379 (namespace cache: mode direct)
#   legacy/batch  10.202.0.6  namespace legacy is not enrolled
# Everything is removed on exit, also on Ctrl-C.
set -euo pipefail

AGENT=${MESH_AGENT_BIN:?}
PODTOOL=${PODTOOL:?}
CG_ROOT=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
CG=$CG_ROOT/mesh-demo
PIN=/sys/fs/bpf/mesh-demo
DIR=/tmp/mesh-demo
BR=mdemobr
ADMIN=127.0.0.1:15099
PODS=(web:2 cron:3 api:4 redis:5 batch:6)
AGENT_PID=

cleanup() {
  trap "" INT TERM
  exec 2>/dev/null  # job-control noise ("Killed") from the pods we stop
  trap - EXIT
  # Pods first (their connections end), then the agent (nothing left to drain).
  for d in "$CG"/*/; do
    [ -f "$d/cgroup.procs" ] && xargs -r kill -9 < "$d/cgroup.procs" 2>/dev/null || true
  done
  [ -n "$AGENT_PID" ] && kill -TERM "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null || true
  [ -f "$CG/cgroup.procs" ] && xargs -r kill -9 < "$CG/cgroup.procs" 2>/dev/null || true
  sleep 0.2
  for p in "${PODS[@]}"; do ip netns del "mdemo-${p%%:*}" 2>/dev/null || true; rmdir "$CG/${p%%:*}" 2>/dev/null || true; done
  ip link del "$BR" 2>/dev/null || true
  rmdir "$CG" 2>/dev/null || true
  rm -rf "$DIR"
  echo "demo: cleaned up (namespaces, bridge, cgroups, pins)"
}
trap cleanup EXIT INT TERM

in_pod() { # in_pod NAME CMD... : run CMD inside the pod's cgroup and network namespace
  local pod=$1; shift
  sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$CG/$pod" ip netns exec "mdemo-$pod" "$@"
}

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mkdir -p "$DIR" "$CG"
ip link add "$BR" type bridge
ip addr add 10.202.0.1/24 dev "$BR"
ip link set "$BR" up
for p in "${PODS[@]}"; do
  name=${p%%:*}; host=${p##*:}
  ip netns add "mdemo-$name"
  ip link add "mdemo$host" type veth peer name eth0 netns "mdemo-$name"
  ip link set "mdemo$host" master "$BR" up
  ip -n "mdemo-$name" addr add "10.202.0.$host/24" dev eth0
  ip -n "mdemo-$name" link set eth0 up
  ip -n "mdemo-$name" link set lo up
  ip -n "mdemo-$name" route add default via 10.202.0.1
  mkdir -p "$CG/$name"
done

cat > "$DIR/mesh.yaml" <<EOF
# Standalone enrolment for the demo node (reference: docs/configuration.md).
namespaces:
  - name: shop
    labels: { mesh-agent.io/dataplane-mode: ambient }
  - name: backend
  - name: cache
    mode: direct
  - name: legacy
workloads:
  - { name: web,   namespace: shop,    ip: 10.202.0.2, netns: /run/netns/mdemo-web }
  - { name: cron,  namespace: shop,    ip: 10.202.0.3, netns: /run/netns/mdemo-cron, labels: { mesh-agent.io/dataplane-mode: none } }
  - { name: api,   namespace: backend, ip: 10.202.0.4, netns: /run/netns/mdemo-api }
  - { name: redis, namespace: cache,   ip: 10.202.0.5, netns: /run/netns/mdemo-redis }
  - { name: batch, namespace: legacy,  ip: 10.202.0.6, netns: /run/netns/mdemo-batch }
EOF

echo "== simulated node: bridge $BR 10.202.0.1/24, cgroup $CG, 5 pods"
# Detached, quiet: the servers are killed at clean-up.
( in_pod api "$PODTOOL" echo --listen 0.0.0.0:8080 > /dev/null 2>&1 & )
( in_pod redis "$PODTOOL" echo --listen 0.0.0.0:6379 > /dev/null 2>&1 & )

echo "== starting mesh-agent (log: $DIR/agent.log)"
sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$CG" \
  "$AGENT" run --config "$DIR/mesh.yaml" --pin-path "$PIN" --cgroup "$CG" \
  --proxy-address 10.202.0.1:15001 --admin-address "$ADMIN" --xds-listen 127.0.0.1:15096 2> "$DIR/agent.log" &
AGENT_PID=$!
# Up to 60 s: under software emulation (cargo xtask kernels) loading takes 10-20 s.
for _ in $(seq 600); do
  curl -sf "http://$ADMIN/ready" > /dev/null 2>&1 && break
  kill -0 "$AGENT_PID" 2>/dev/null || { cat "$DIR/agent.log"; exit 1; }
  sleep 0.1
done
curl -sf "http://$ADMIN/ready"

traffic() { # traffic FROM TO BYTES LABEL
  local r
  r=$(in_pod "$1" "$PODTOOL" echo-client --to "$2" --bytes "$3")
  printf '  %-14s -> %-16s %-44s %s\n' "$1" "$2" "$4" "$(echo "$r" | grep -q '"errors":\[\]' && echo "intact ($3 B each way)" || echo "FAILED: $r")"
}
echo "== traffic"
traffic web   10.202.0.4:8080 4194304 "(enrolled -> proxied: node proxy + sk_msg)"
traffic web   10.202.0.5:6379 4194304 "(enrolled -> direct: socket to socket)"
traffic cron  10.202.0.4:8080 1048576 "(opted-out pod: not captured)"
traffic batch 10.202.0.4:8080 1048576 "(namespace not enrolled: not captured)"

echo
echo "== what the node proxy saw (GET /metrics, mesh_tcp_*)"
curl -s "http://$ADMIN/metrics" | awk '
  /^mesh_tcp_(connections_opened|received_bytes|sent_bytes)_total\{/ {
    match($0, /source_workload="[^"]*"/); src=substr($0, RSTART+17, RLENGTH-18)
    match($0, /destination_address="[^"]*"/); dst=substr($0, RSTART+21, RLENGTH-22)
    match($0, /skmsg="[^"]*"/); sk=substr($0, RSTART+7, RLENGTH-8)
    split($1, n, "{"); key=src" -> "dst" skmsg="sk; v[key, n[1]]=$2; keys[key]=1 }
  END { printf "  %-44s %8s %12s %12s\n", "FLOW", "CONNS", "RECEIVED", "SENT";
        for (k in keys) printf "  %-44s %8s %12s %12s\n", k, v[k,"mesh_tcp_connections_opened_total"], v[k,"mesh_tcp_received_bytes_total"], v[k,"mesh_tcp_sent_bytes_total"] }'

echo
echo "== datapath counters (mesh-agent dump STATS, non-zero)"
"$AGENT" dump STATS --pin-path "$PIN" | awk 'NR == 1 || $2 != 0 { print "  " $0 }'

echo
echo "== a live captured connection, decoded (mesh-agent dump FLOWS / SOCKHASH)"
in_pod web "$PODTOOL" ping --to 10.202.0.4:8080 --count 3000000 > /dev/null 2>&1 &
PING=$!
sleep 0.5
"$AGENT" dump FLOWS --pin-path "$PIN" | sed 's/^/  /'
"$AGENT" dump SOCKHASH --pin-path "$PIN" | sed 's/^/  /'
kill "$PING" 2>/dev/null || true
wait "$PING" 2>/dev/null || true
echo
echo "== pinned maps (mesh-agent maps); try also: bpftool map dump pinned $PIN/FLOWS"
"$AGENT" maps --pin-path "$PIN" | sed 's/^/  /'
echo
ipt=$(iptables-save 2>/dev/null | grep -c '^-A' || true)
nft=$(nft list ruleset 2>/dev/null | grep -c '^table' || true)
echo "== firewall: $ipt iptables rules, $nft nftables tables on this machine (the datapath adds none)"
