#!/usr/bin/env bash
# The zero-trust demo on a simulated two-node cluster (run it with
# `cargo xtask demo --nodes 2`, as root; `cargo xtask test` runs it once as a smoke check).
#
# Laid out as tests/src/cluster.rs lays out a SimCluster (docs/multinode.md), under names
# of its own so it never meets a test's cluster or the single-node demo:
#
#   netns mdemoc-ul (the underlay): bridge br0, ports n0, n1
#   netns mdemoc-n0: eth0 10.203.0.1/24, br0 10.204.0.1/24, route 10.205.0.0/24 via 10.203.0.2
#   netns mdemoc-n1: eth0 10.203.0.2/24, br0 10.205.0.1/24, route 10.204.0.0/24 via 10.203.0.1
#   pods  mdemoc-n0-web    10.204.0.2  namespace shop,    service account web
#         mdemoc-n0-batch  10.204.0.3  namespace shop,    service account batch
#         mdemoc-n0-legacy 10.204.0.4  namespace legacy,  not in the mesh (the capture's control)
#         mdemoc-n1-echo   10.205.0.2  namespace backend, service account echo, echo server :8080
#   cgroups <cgroup2>/mesh-demo-c-n<i> (node i's agent), .../<pod> (the pod's processes)
#   pins    /sys/fs/bpf/mesh-demo-c-n<i>; files /tmp/mesh-demo-cluster (CA, enrolment, logs)
#
# Each agent runs inside its node's netns (nsenter, not `ip netns exec`, which remounts
# /sys and would hide bpffs and the cgroup2 mount) and its node's cgroup, with the
# agent's default admin (127.0.0.1:15020) and xDS addresses on the node's own loopback.
# Both agents read the same enrolment file (every workload with its `node:`) and sign
# with the same root (`mesh-agent ca init`). Everything is removed on any exit; leftovers
# of a killed run are removed at the start.
set -euo pipefail

AGENT=${MESH_AGENT_BIN:?MESH_AGENT_BIN: path to the mesh-agent binary}
PODTOOL=${PODTOOL:?PODTOOL: path to the podtool binary}
[ "$(id -u)" = 0 ] || { echo "demo-cluster: must run as root" >&2; exit 1; }

P=mdemoc                        # network namespace prefix
CGP=mesh-demo-c                 # cgroup and pin folder prefix
DIR=/tmp/mesh-demo-cluster
CG_ROOT=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
[ -n "$CG_ROOT" ] || { echo "demo-cluster: no cgroup2 mount" >&2; exit 1; }
NODES=(0 1)
CG_UL=$CG_ROOT/$CGP-ul          # the underlay capture's process
# pod:node:host:namespace:service-account
PODS=(web:0:2:shop:web batch:0:3:shop:batch legacy:0:4:legacy:default echo:1:2:backend:echo)
SERVER=10.205.0.2:8080
MARKER="MESH-DEMO-MARKER-4b2d9e-cleartext"
AGENT_PIDS=()
STARTED=$(date +%s.%N)

node_ns() { echo "/run/netns/$P-n$1"; }
node_cg() { echo "$CG_ROOT/$CGP-n$1"; }
field() { echo "$1" | cut -d: -f"$2"; } # field POD-SPEC INDEX (1..5)

teardown() { # removes everything this script creates (also a killed run's leftovers)
  local n cg pid
  # Processes first: pods', then agents' (SIGTERM so they detach, SIGKILL if they hang),
  # then the underlay capture's.
  for n in "${NODES[@]}"; do
    cg=$(node_cg "$n")
    for d in "$cg"/*/; do
      [ -f "$d/cgroup.procs" ] && xargs -r kill -9 < "$d/cgroup.procs" 2>/dev/null || true
    done
  done
  for pid in "${AGENT_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${AGENT_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  for cg in $(node_cg 0) $(node_cg 1) "$CG_UL"; do
    [ -f "$cg/cgroup.procs" ] && xargs -r kill -9 < "$cg/cgroup.procs" 2>/dev/null || true
  done
  for pid in "${AGENT_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do ip netns del "$ns" 2>/dev/null || true; done
  for n in "${NODES[@]}"; do
    cg=$(node_cg "$n")
    # A cgroup can be removed once its processes are gone (SIGKILL is asynchronous).
    for _ in $(seq 100); do
      for d in "$cg"/*/; do [ -d "$d" ] && rmdir "$d" 2>/dev/null || true; done
      rmdir "$cg" 2>/dev/null || true
      [ -d "$cg" ] || break
      sleep 0.05
    done
    # Pins and xDS socket folder of an agent that could not detach (killed).
    rm -rf "/sys/fs/bpf/$CGP-n$n" "/run/mesh-agent/$CGP-n$n"
  done
  for _ in $(seq 100); do rmdir "$CG_UL" 2>/dev/null || true; [ -d "$CG_UL" ] || break; sleep 0.05; done
  rm -rf "$DIR"
}

cleanup() { # cleanup [STATUS]: STATUS for a signal, else the script's own
  local rc=${1:-$?}
  trap "" INT TERM
  trap - EXIT ERR
  set +e  # clean up all the rest whatever fails
  exec 2>/dev/null  # job-control noise ("Killed") from the processes we stop
  teardown
  [ "$(cat "$LOCK" 2> /dev/null)" = $$ ] && rm -f "$LOCK"
  left=$( { ip netns list | grep "^$P-"; ls -d "$CG_ROOT/$CGP"-* /sys/fs/bpf/"$CGP"-* "$DIR"; } 2>/dev/null || true)
  if [ -n "$left" ]; then
    echo "demo-cluster: LEFT BEHIND: $left"
    rc=1
  else
    echo "demo-cluster: cleaned up (namespaces, agents, cgroups, pins, $DIR)"
  fi
  exit "$rc"
}

fail() { echo "demo-cluster: FAILED: $*" >&2; exit 1; }

# "${IN_CG[@]}" CGROUP CMD... : CMD in that cgroup (what it starts stays there). An array,
# not a function: `"${IN_CG[@]}" ... &` is a simple command, so $! is CMD's own PID (a
# function would run in a subshell, and SIGTERM would reach the subshell, not CMD).
IN_CG=(sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh)

in_pod() { # in_pod POD CMD... : CMD inside the pod's cgroup and network namespace
  local pod=$1 spec; shift
  for spec in "${PODS[@]}"; do [ "${spec%%:*}" = "$pod" ] && break; done
  local n; n=$(field "$spec" 2)
  "${IN_CG[@]}" "$(node_cg "$n")/$pod" nsenter --net="/run/netns/$P-n$n-$pod" "$@"
}

in_node() { # in_node N CMD... : CMD inside node N's network namespace
  local n=$1; shift
  nsenter --net="$(node_ns "$n")" "$@"
}

admin() { in_node "$1" curl -sf --max-time 5 "http://127.0.0.1:15020$2"; }

metric() { # metric NODE NAME 'k="v",...': the sum of NAME's samples with those labels (and any others)
  admin "$1" /metrics | awk -v name="$2" -v want="$3" '
    BEGIN { n = split(want, w, ",") }
    index($1, name "{") == 1 { ok = 1; for (i = 1; i <= n; i++) if (index($1, w[i]) == 0) ok = 0; if (ok) v += $2 }
    END { print v + 0 }'
}

header() { printf '\n== %s\n' "$*"; }

# One run at a time: a PID file (a killed run's stale one is taken over; removed on exit).
# Not flock: the lock would pass to the agents and pods, and outlive a killed run.
LOCK=/run/mesh-demo-cluster.pid
if ! (set -o noclobber; echo $$ > "$LOCK") 2> /dev/null; then
  other=$(cat "$LOCK" 2> /dev/null || true)
  if [ -n "$other" ] && grep -qa demo-cluster "/proc/$other/cmdline" 2> /dev/null; then
    echo "demo-cluster: another run (pid $other) is in progress" >&2
    exit 1
  fi
  echo $$ > "$LOCK"
fi

trap cleanup EXIT
trap 'echo "demo-cluster: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
trap 'cleanup 130' INT
trap 'cleanup 143' TERM
# Leftovers of a killed run (its trap never ran), then a fresh start.
teardown
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

header "1/5 a simulated cluster: underlay $P-ul, nodes $P-n0 and $P-n1, ${#PODS[@]} pods"
mkdir -p "$DIR"
ip netns add "$P-ul"
ip -n "$P-ul" link set lo up
ip -n "$P-ul" link add br0 type bridge
ip -n "$P-ul" link set br0 up
for n in "${NODES[@]}"; do
  ns=$P-n$n
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$P-ul" link add "n$n" type veth peer name eth0 netns "$ns"
  ip -n "$P-ul" link set "n$n" master br0 up
  ip -n "$ns" addr add "10.203.0.$((n + 1))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link add br0 type bridge
  ip -n "$ns" addr add "10.$((204 + n)).0.1/24" dev br0
  ip -n "$ns" link set br0 up
  in_node "$n" sysctl -qw net.ipv4.ip_forward=1
  mkdir -p "$(node_cg "$n")"
done
# Routes between the pod ranges through the nodes' underlay addresses (a routing CNI's).
ip -n "$P-n0" route add 10.205.0.0/24 via 10.203.0.2
ip -n "$P-n1" route add 10.204.0.0/24 via 10.203.0.1
j=0
for spec in "${PODS[@]}"; do
  pod=${spec%%:*}; n=$(field "$spec" 2); host=$(field "$spec" 3)
  ns=$P-n$n-$pod
  ip netns add "$ns"
  ip -n "$P-n$n" link add "v$j" type veth peer name eth0 netns "$ns"
  ip -n "$P-n$n" link set "v$j" master br0 up
  ip -n "$ns" addr add "10.$((204 + n)).0.$host/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" route add default via "10.$((204 + n)).0.1"
  mkdir -p "$(node_cg "$n")/$pod"
  printf '  node n%s  pod %-7s 10.%s.0.%-3s namespace %-8s service account %s\n' \
    "$n" "$pod" "$((204 + n))" "$host" "$(field "$spec" 4)" "$(field "$spec" 5)"
  j=$((j + 1))
done

# One root for the cluster: each node's embedded CA signs its own workloads with it.
"$AGENT" ca init --dir "$DIR/ca" > /dev/null 2>&1 || { "$AGENT" ca init --dir "$DIR/ca"; fail "ca init"; }
echo "  cluster CA: one root in $DIR/ca (mesh-agent ca init), every agent's --ca-dir"
{
  echo "# Both nodes read this file: every workload with its node (docs/configuration.md)."
  echo "namespaces:"
  echo "  - { name: shop, labels: { mesh-agent.io/dataplane-mode: ambient } }"
  echo "  - { name: backend, labels: { istio.io/dataplane-mode: ambient } }"
  echo "  - { name: legacy }"
  echo "workloads:"
  for spec in "${PODS[@]}"; do
    pod=${spec%%:*}; n=$(field "$spec" 2)
    labels="{}"; [ "$pod" = echo ] && labels="{ app: echo }"
    echo "  - { name: $pod, namespace: $(field "$spec" 4), ip: 10.$((204 + n)).0.$(field "$spec" 3), netns: /run/netns/$P-n$n-$pod, node: n$n, service_account: $(field "$spec" 5), labels: $labels }"
  done
} > "$DIR/mesh.yaml.base"
cp "$DIR/mesh.yaml.base" "$DIR/mesh.yaml"

( in_pod echo "$PODTOOL" echo --listen 0.0.0.0:8080 > /dev/null 2>&1 & )

for n in "${NODES[@]}"; do
  cg=$(node_cg "$n")
  "${IN_CG[@]}" "$cg" nsenter --net="$(node_ns "$n")" env MESH_LOG=info \
    "$AGENT" run --config "$DIR/mesh.yaml" --pin-path "/sys/fs/bpf/$CGP-n$n" --cgroup "$cg" \
    --proxy-address "10.$((204 + n)).0.1:15001" --reload-interval-ms 100 \
    --node-name "n$n" --ca-dir "$DIR/ca" > /dev/null 2> "$DIR/agent-n$n.log" &
  AGENT_PIDS+=($!)
done
for i in "${!NODES[@]}"; do
  n=${NODES[$i]}
  for _ in $(seq 150); do
    admin "$n" /ready > /dev/null 2>&1 && break
    kill -0 "${AGENT_PIDS[$i]}" 2>/dev/null || { cat "$DIR/agent-n$n.log" >&2; fail "agent n$n exited"; }
    sleep 0.1
  done
  admin "$n" /ready > /dev/null || { tail -20 "$DIR/agent-n$n.log" >&2; fail "agent n$n not ready"; }
  # The tunnel needs the workloads in force on both sides.
  for _ in $(seq 100); do
    admin "$n" /config_dump 2>/dev/null | grep -q 'spiffe://cluster.local/ns/backend/sa/echo' && break
    sleep 0.1
  done
  echo "  agent on n$n: pid ${AGENT_PIDS[$i]}, ready (netns $P-n$n, cgroup $(node_cg "$n"), log $DIR/agent-n$n.log)"
done

header "2/5 cross-node traffic: web (n0) -> echo (n1) $SERVER, in the HBONE tunnel"
# A capture on the underlay: tcpdump when installed, else an AF_PACKET socket in python3.
CAP=$DIR/underlay.pcap
CAPTOOL=
mkdir -p "$CG_UL"
if command -v tcpdump > /dev/null; then
  CAPTOOL=tcpdump
  "${IN_CG[@]}" "$CG_UL" nsenter --net="/run/netns/$P-ul" tcpdump -i any -s 0 -U -w "$CAP" > /dev/null 2> "$DIR/tcpdump.log" &
  CAP_PID=$!
elif command -v python3 > /dev/null; then
  CAPTOOL="python3 AF_PACKET socket (tcpdump not installed)"
  "${IN_CG[@]}" "$CG_UL" nsenter --net="/run/netns/$P-ul" python3 -c '
import os, signal, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.settimeout(0.1)
out = open(sys.argv[1], "wb")
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
open(sys.argv[1] + ".ready", "w").close()
while not stop:
    try:
        out.write(s.recv(65536))
    except socket.timeout:
        pass
out.close()
' "$CAP" &
  CAP_PID=$!
else
  CAP_PID=
fi
if [ -n "$CAP_PID" ]; then
  # python3 says when its socket is open; tcpdump, when it has created the file.
  for _ in $(seq 50); do [ -e "$CAP.ready" ] || { [ "$CAPTOOL" = tcpdump ] && [ -e "$CAP" ]; } && break; sleep 0.1; done
  sleep 0.3
fi
UL_BEFORE=$(in_node 0 cat /proc/net/dev | awk -F'[: ]+' '$2 == "eth0" { print $3 + $11 }')
out_before=$(metric 0 mesh_hbone_streams_total 'direction="out"')
in_before=$(metric 1 mesh_hbone_streams_total 'direction="in"')

r=$(in_pod web "$PODTOOL" raw --to "$SERVER" --send "$MARKER" --half-close --deadline-ms 5000)
echo "$r" | grep -q "\"status_line\":\"$MARKER\"" || fail "the marker did not come back: $r"
echo "  web    -> echo  marker \"$MARKER\" echoed back: $r"
r=$(in_pod web "$PODTOOL" echo-client --to "$SERVER" --bytes 4194304 --deadline-ms 20000)
echo "$r" | grep -q '"errors":\[\]' && echo "$r" | grep -q '"intact":1' || fail "web -> echo: $r"
echo "  web    -> echo  4 MiB each way: intact (sha256 sent = received)"
# The control: a pod outside the mesh sends the same marker, which crosses in clear.
r=$(in_pod legacy "$PODTOOL" raw --to "$SERVER" --send "$MARKER-legacy" --half-close --deadline-ms 5000 || true)
echo "  legacy -> echo  (not in the mesh: plain text, the capture's control) $(echo "$r" | grep -o '"outcome":"[^"]*"' || echo "$r")"

out_after=$(metric 0 mesh_hbone_streams_total 'direction="out"')
in_after=$(metric 1 mesh_hbone_streams_total 'direction="in"')
UL_AFTER=$(in_node 0 cat /proc/net/dev | awk -F'[: ]+' '$2 == "eth0" { print $3 + $11 }')
printf '  n0 mesh_hbone_streams_total{direction="out"} %s -> %s\n' "$out_before" "$out_after"
printf '  n1 mesh_hbone_streams_total{direction="in"}  %s -> %s\n' "$in_before" "$in_after"
[ "$out_after" -ge $((out_before + 2)) ] && [ "$in_after" -ge $((in_before + 2)) ] \
  || fail "the web -> echo streams did not go through the tunnel"
printf '  n0 eth0 (underlay) bytes rx+tx during the traffic: %s\n' "$((UL_AFTER - UL_BEFORE))"

if [ -n "$CAP_PID" ]; then
  kill -TERM "$CAP_PID" 2>/dev/null || true
  wait "$CAP_PID" 2>/dev/null || true
  cap_size=$(stat -c %s "$CAP")
  # Every occurrence (the legacy marker starts with the mesh one: subtract it).
  legacy=$( { grep -a -o -F "$MARKER-legacy" "$CAP" || true; } | wc -l)
  mesh_clear=$( { grep -a -o -F "$MARKER" "$CAP" || true; } | wc -l)
  tls_port=$(python3 -c '
import sys
d = open(sys.argv[1], "rb").read()
print("yes" if (15008).to_bytes(2, "big") in d else "no")' "$CAP" 2>/dev/null || echo "?")
  echo "  capture on the underlay ($CAPTOOL): $cap_size bytes"
  echo "    marker from web (mesh, tunnel):        seen $((mesh_clear - legacy)) times in clear"
  echo "    marker from legacy (outside the mesh): seen $legacy times in clear (the control)"
  echo "    HBONE port 15008 in the frames: $tls_port"
  [ "$((mesh_clear - legacy))" = 0 ] || fail "the mesh's marker crossed the underlay in clear"
  [ "$legacy" -ge 1 ] || fail "the capture missed the control's plain text: it proves nothing"
else
  echo "  capture: skipped (neither tcpdump nor python3 here); only the counters above"
fi

header "3/5 identities (mesh-agent certs, from inside each node's netns)"
for n in "${NODES[@]}"; do
  echo "  node n$n:"
  in_node "$n" "$AGENT" certs | sed 's/^/    /'
done
in_node 0 "$AGENT" certs | grep -q 'spiffe://cluster.local/ns/shop/sa/web' || fail "n0 holds no certificate for web"
in_node 1 "$AGENT" certs | grep -q 'spiffe://cluster.local/ns/backend/sa/echo' || fail "n1 holds no certificate for echo"

header "4/5 policy: AuthorizationPolicy allow-web (ALLOW principal cluster.local/ns/shop/sa/web) on echo"
try() { # try POD: one 64 KiB echo to the server; "allowed" or the error
  local r
  r=$(in_pod "$1" "$PODTOOL" echo-client --to "$SERVER" --bytes 65536 --deadline-ms 5000 2>&1 || true)
  if echo "$r" | grep -q '"errors":\[\]' && echo "$r" | grep -q '"intact":1'; then echo allowed
  else echo "refused $(echo "$r" | grep -o '"errors":\[[^]]*\]' || echo "$r")"; fi
}
echo "  before: batch -> echo $(try batch)"
{
  cat "$DIR/mesh.yaml.base"
  cat <<'EOF'
authorization_policies:
  - metadata: { name: allow-web, namespace: backend }
    spec:
      selector: { matchLabels: { app: echo } }
      action: ALLOW
      rules: [ { from: [ { source: { principals: [ cluster.local/ns/shop/sa/web ] } } ] } ]
EOF
} > "$DIR/mesh.yaml.tmp"
mv "$DIR/mesh.yaml.tmp" "$DIR/mesh.yaml"
sed -n '/^authorization_policies:/,$p' "$DIR/mesh.yaml" | sed 's/^/    /'
batch=
for _ in $(seq 50); do
  batch=$(try batch)
  [ "${batch%% *}" = refused ] && break
  sleep 0.2
done
web=$(try web)
echo "  after:  web   -> echo $web"
echo "          batch -> echo $batch"
[ "$web" = allowed ] || fail "web was refused"
[ "${batch%% *}" = refused ] || fail "batch was not refused"
echo "  n1 mesh_authz_decisions_total (inbound):"
admin 1 /metrics | grep '^mesh_authz_decisions_total{direction="inbound"' | sed 's/^/    /'
# A denial for want of a matching ALLOW is counted and logged under the ALLOW policy that
# applies (the first, by name), with the reason.
echo "  n1 agent log, the denial (allow-web applies to echo and does not match batch):"
grep 'connection denied' "$DIR/agent-n1.log" | grep 'sa/batch' | tail -1 | sed 's/^/    /'
[ "$(metric 1 mesh_authz_decisions_total 'direction="inbound",verdict="allow",policy="backend/allow-web"')" -ge 1 ] \
  || fail "no allow decision by backend/allow-web"
[ "$(metric 1 mesh_authz_decisions_total 'direction="inbound",verdict="deny",policy="backend/allow-web"')" -ge 1 ] \
  || fail "no deny decision under backend/allow-web"
grep 'connection denied' "$DIR/agent-n1.log" | grep -q 'sa/batch' || fail "no denial logged for batch"

header "5/5 no firewall rule in any of the cluster's network namespaces"
ipt=0; nft=0; tools=
command -v iptables-save > /dev/null && tools="iptables-save"
command -v nft > /dev/null && tools="$tools nft"
# (`ip netns exec` is fine here: these tools need neither bpffs nor the cgroup mount.)
for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" | sort); do
  a=-; b=-
  if command -v iptables-save > /dev/null; then
    a=$(ip netns exec "$ns" iptables-save 2>/dev/null | grep -c '^-A' || true); ipt=$((ipt + a))
  fi
  if command -v nft > /dev/null; then
    b=$(ip netns exec "$ns" nft list ruleset 2>/dev/null | grep -c '^table' || true); nft=$((nft + b))
  fi
  printf '  %-18s iptables rules: %s, nftables tables: %s\n' "$ns" "$a" "$b"
done
[ -n "$tools" ] || echo "  (neither iptables-save nor nft installed: not checked)"
[ "$ipt" = 0 ] && [ "$nft" = 0 ] || fail "firewall rules found"

elapsed=$(awk -v s="$STARTED" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
header "summary (${elapsed} s)"
echo "  traffic  web (n0) -> echo (n1): intact; HBONE streams n0 out +$((out_after - out_before)), n1 in +$((in_after - in_before))"
if [ -n "$CAP_PID" ]; then
  echo "  wire     the app's marker never crossed the underlay in clear (a non-mesh pod's did)"
fi
echo "  identity SPIFFE certificates from one cluster root on both nodes (web on n0, echo on n1)"
echo "  policy   backend/allow-web: web allowed, batch refused (${batch#refused }); the allow counted under the policy, the denial counted and logged"
echo "  firewall 0 iptables rules, 0 nftables tables in $(ip netns list | grep -c "^$P-") namespaces${tools:+ ($tools)}"
