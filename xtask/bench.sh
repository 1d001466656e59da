#!/usr/bin/env bash
# The measurements of `cargo xtask bench` on a simulated node: two pods (network
# namespaces + cgroups) on a bridge, the agent, and reference proxies in the node's network
# namespace. Appends one line per measurement to $RAW:
#   suite path placement metric run value
# and xtask turns those lines into JSON, Markdown and an SVG plot. Run it through
# `cargo xtask bench` (which builds the binaries and sets the variables below), as root.
#
#   bench.sh check             refuse (exit 1) if an earlier run left something behind
#   bench.sh clean             remove what an earlier run left behind
#   bench.sh run SUITE...      SUITE: l4 | footprint
#
# Names (distinct from the tests' mt*/mesh-test-* and latency's mlat*): netns mbn-cli,
# mbn-srv; bridge mbnbr (10.204.0.1/24); cgroup <cgroup2>/mesh-bench; pins
# /sys/fs/bpf/mesh-bench; scratch /tmp/mesh-bench.
set -euo pipefail

AGENT=${MESH_AGENT_BIN:-}; PODTOOL=${PODTOOL:-}; BENCHTOOL=${BENCHTOOL:-}; ENVOY=${ENVOY_BIN:-}
RUNS=${RUNS:-5}; SECS=${SECS:-2}; SMOKE=${SMOKE:-0}; RAW=${RAW:-/dev/stdout}
# Set: a `perf record -C 0 -g` of every client run goes there, with a text report.
PERF_DIR=${PERF_DIR:-}; CUR=
PLACEMENTS=${PLACEMENTS:-1cpu 2cpu}

CG_ROOT=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
CG=$CG_ROOT/mesh-bench; PIN=/sys/fs/bpf/mesh-bench; DIR=/tmp/mesh-bench; BR=mbnbr
NODE_IP=10.204.0.1; CLI_IP=10.204.0.2; SRV_IP=10.204.0.3
ADMIN=127.0.0.1:15097; ENVOY_ADMIN=127.0.0.1:15096; PROXY_PORT=15001
# Servers in the server pod, and the ports the reference proxies listen on in the node
# for each of them (same order): sockperf, iperf3, benchtool reply.
SRV_PORTS=(11111 5201 8081); HAPROXY_PORTS=(21111 21201 21081); ENVOY_PORTS=(22111 22201 22081)
HOLD_PORT=9000; SINK_PORT=9001; ECHO_PORT=9002
# TCP ports the run binds in the node's network namespace.
NODE_PORTS=("$PROXY_PORT" "${ADMIN##*:}" "${ENVOY_ADMIN##*:}" "${HAPROXY_PORTS[@]}" "${ENVOY_PORTS[@]}")

TAG=bench; NSP=mbn; PODS="cli:2 srv:3"
# shellcheck source=bench-node.sh
. "$(dirname "${BASH_SOURCE[0]}")/bench-node.sh"

pod_up() { # Tens of thousands of short connections per run must find free ports.
  ip netns exec "$NSP-$1" sysctl -qw net.ipv4.ip_local_port_range="10000 65000" net.ipv4.tcp_tw_reuse=1
}

config() { # config ENROLLED(0/1) MODE(proxied/direct)
  local label="{}"; [ "$1" = 1 ] && label="{ mesh-agent.io/dataplane-mode: ambient }"
  printf 'namespaces:\n  - { name: a, labels: %s }\n  - { name: b, mode: %s }\nworkloads:\n  - { name: cli, namespace: a, ip: %s, netns: /run/netns/mbn-cli }\n  - { name: srv, namespace: b, ip: %s, netns: /run/netns/mbn-srv }\n' \
    "$label" "$2" "$CLI_IP" "$SRV_IP" > "$DIR/mesh.yaml"
}

start_agent() { # start_agent CPUS AGENT-FLAGS...
  local cpus=$1; shift
  # Proxied connections are two sockets each in the agent: give it every fd we may.
  bg agent node "$cpus" prlimit --nofile="$NOFILE:$NOFILE" "$AGENT" run --config "$DIR/mesh.yaml" \
    --pin-path "$PIN" --cgroup "$CG" --proxy-address "$NODE_IP:$PROXY_PORT" --admin-address "$ADMIN" "$@"
  for _ in $(seq 100); do curl -sf "http://$ADMIN/ready" > /dev/null 2>&1 && return; sleep 0.05; done
  cat "$DIR/agent.log" >&2; die "the agent did not become ready"
}

agent_pid() {
  # prlimit and taskset exec, so the pid we started is the agent's.
  cat "$DIR/agent.pid"
}

start_haproxy() { # start_haproxy CPUS [splice]: splice = haproxy's best for bulk (splice-auto)
  # With splice haproxy also reserves pipes (two fds each) per connection: with maxconn
  # 9000 it wants more fds than this container's hard limit (20,000) and does not start.
  local i splice= maxconn=9000
  [ "${2:-}" = splice ] && splice='  option splice-auto\n' && maxconn=4000
  {
    printf "global\n  nbthread %s\n  maxconn $maxconn\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n$splice\n" "$(cpu_count "$1")"
    for i in 0 1 2; do
      printf 'listen l%s\n  bind %s:%s\n  server s %s:%s\n\n' "$i" "$NODE_IP" "${HAPROXY_PORTS[$i]}" "$SRV_IP" "${SRV_PORTS[$i]}"
    done
  } > "$DIR/haproxy.cfg"
  bg haproxy ref "$1" haproxy -db -f "$DIR/haproxy.cfg"
  for i in 0 1 2; do wait_port node "$NODE_IP" "${HAPROXY_PORTS[$i]}"; done
}

start_envoy() { # start_envoy CPUS
  local i
  {
    printf 'admin:\n  address: { socket_address: { address: %s, port_value: %s } }\nstatic_resources:\n  listeners:\n' "${ENVOY_ADMIN%%:*}" "${ENVOY_ADMIN##*:}"
    for i in 0 1 2; do
      printf '  - name: l%s\n    address: { socket_address: { address: %s, port_value: %s } }\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.tcp_proxy\n        typed_config:\n          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n          stat_prefix: l%s\n          cluster: c%s\n' \
        "$i" "$NODE_IP" "${ENVOY_PORTS[$i]}" "$i" "$i"
    done
    printf '  clusters:\n'
    for i in 0 1 2; do
      printf '  - name: c%s\n    type: STATIC\n    connect_timeout: 5s\n    load_assignment:\n      cluster_name: c%s\n      endpoints:\n      - lb_endpoints:\n        - endpoint: { address: { socket_address: { address: %s, port_value: %s } } }\n' \
        "$i" "$i" "$SRV_IP" "${SRV_PORTS[$i]}"
    done
  } > "$DIR/envoy.yaml"
  bg envoy ref "$1" "$ENVOY" -c "$DIR/envoy.yaml" --concurrency "$(cpu_count "$1")" --log-level warn --disable-hot-restart
  for i in 0 1 2; do wait_port node "$NODE_IP" "${ENVOY_PORTS[$i]}"; done
}

# --- measurements ----------------------------------------------------------------------

emit() { echo "$*" >> "$RAW"; }

start_servers() { # start_servers CPUS
  bg sockperf srv "$1" sockperf server --tcp -i 0.0.0.0 -p "${SRV_PORTS[0]}"
  bg iperf3 srv "$1" iperf3 -s -p "${SRV_PORTS[1]}"
  bg reply srv "$1" "$BENCHTOOL" reply --listen "0.0.0.0:${SRV_PORTS[2]}"
  local p; for p in "${SRV_PORTS[@]}"; do wait_port mbn-srv 0.0.0.0 "$p"; done
}

# Every client fails loudly: a path that breaks must not turn into a missing figure. One
# that stalls (no result within CLIENT_TIMEOUT s: `timeout` ends it) is run again, at most
# twice, and said in the log; a third stall ends the run.
CLIENT_TIMEOUT=$(awk -v s="$SECS" 'BEGIN {printf "%d", s * 5 + 60}')
client() { # client NAME CPUS CMD... -> stdout of CMD
  local name=$1 out perf_pid= rec; shift
  if [ -n "$PERF_DIR" ]; then
    rec=$PERF_DIR/$CUR-$name.data
    # cpu 0 only: in the one-vCPU placement all of the path's work is there.
    perf record -q -C 0 -g -o "$rec" > /dev/null 2>&1 &
    perf_pid=$!; echo "$perf_pid" > "$DIR/perf.pid"; sleep 0.5
  fi
  local attempt rc
  for attempt in 1 2 3; do
    rc=0; out=$(in_cg cli "$1" timeout -k 5 "$CLIENT_TIMEOUT" "${@:2}" 2> "$DIR/$name.err") || rc=$?
    # 124: `timeout` stopped it; 137: it had to kill it.
    [ "$rc" = 124 ] || [ "$rc" = 137 ] || break
    log "$name stalled (no result in $CLIENT_TIMEOUT s; attempt $attempt of 3): ${*:2}"
  done
  if [ "$rc" != 0 ]; then
    echo "$out" >&2; cat "$DIR/$name.err" >&2; die "$name failed: $*"
  fi
  if [ -n "$perf_pid" ]; then
    # perf writes its file on SIGTERM as on SIGINT (which background jobs ignore).
    kill -TERM "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; rm -f "$DIR/perf.pid"
    { perf report -i "$rec" --no-children --sort comm -g none --stdio
      perf report -i "$rec" --no-children --sort comm,dso,sym -g none --percent-limit 0.3 --stdio
    } 2> /dev/null | grep -v '^$' > "${rec%.data}.txt" || true
  fi
  echo "$out"
}

lat_secs() { [ "$SMOKE" = 1 ] && echo 1 || echo "$SECS"; }

# A sockperf client now and then stalls at start ("No valid observations", or no figures):
# such a run is measured again, up to three times, and said in the log (with sockperf's own
# words); a path that keeps failing ends the run.
measure_latency() { # measure_latency PATH PLACEMENT RUN CPU HOST PORT
  local out= attempt
  local pct; pct() { awk -v q="$1" '$2 == "--->" && $3 == "percentile" && $4 == q {print $6}' <<< "$out"; }
  local p50= p99= p999= tps=
  for attempt in 1 2 3; do
    if out=$(client sockperf "$4" sockperf ping-pong --tcp -i "$5" -p "$6" -m 64 -t "$(lat_secs)" --full-rtt); then
      p50=$(pct 50.000); p99=$(pct 99.000); p999=$(pct 99.900)
      tps=$(sed -n 's/.*\[Valid Duration\] RunTime=\([0-9.]*\) sec;.*ReceivedMessages=\([0-9]*\).*/\2 \1/p' <<< "$out" | awk '$2 > 0 {printf "%.1f", $1 / $2}')
      [ -n "$p50" ] && [ -n "$p99" ] && [ -n "$p999" ] && [ -n "$tps" ] && break
    fi
    log "sockperf through $1 gave no valid figures (attempt $attempt of 3): $({ echo "$out"; cat "$DIR/sockperf.err" 2> /dev/null; } | grep -m1 -i 'no valid\|error' || true)"
    p50=
  done
  [ -n "$p50" ] || { echo "$out" >&2; die "cannot read sockperf's output ($1) after 3 attempts"; }
  emit l4 "$1" "$2" p50_us "$3" "$p50"; emit l4 "$1" "$2" p99_us "$3" "$p99"
  emit l4 "$1" "$2" p999_us "$3" "$p999"; emit l4 "$1" "$2" tps "$3" "$tps"
}

measure_bulk() { # measure_bulk PATH PLACEMENT RUN CPU HOST PORT CONNS
  local len=(-t "$SECS"); [ "$SMOKE" = 1 ] && len=(-n 64M)
  local out gbps
  out=$(client "bulk$7" "$4" iperf3 -c "$5" -p "$6" -P "$7" "${len[@]}" -f m)
  # The receiver's figure: the last "receiver" line is the [SUM] one with -P > 1.
  gbps=$(awk '/receiver/ {for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") v = $i} END {if (v != "") printf "%.3f", v / 1000}' <<< "$out")
  [ -n "$gbps" ] || { echo "$out" >&2; die "cannot read iperf3's output ($1)"; }
  emit l4 "$1" "$2" "bulk${7}_gbps" "$3" "$gbps"
}

measure_crr() { # measure_crr PATH PLACEMENT RUN CPU HOST PORT
  local secs=$SECS; [ "$SMOKE" = 1 ] && secs=0.5
  local out; out=$(client crr "$4" "$BENCHTOOL" crr --to "$5:$6" --secs "$secs")
  local rate errors
  rate=$(awk '{print $4}' <<< "$out"); errors=$(awk '{print $6}' <<< "$out")
  [ -n "$rate" ] || die "cannot read benchtool crr's output ($1): $out"
  [ "$errors" = 0 ] || die "connect-request-close through $1 had errors: $out"
  emit l4 "$1" "$2" cps "$3" "$rate"
}

# A fast writer into a slow reader must lose nothing and see no error (sk_msg has no flow
# control of its own: the agent's back-pressure check must hand the pair back to TCP).
measure_slow_reader() { # measure_slow_reader PATH PLACEMENT RUN CPU HOST
  local bytes=$((32 << 20)); [ "$SMOKE" = 1 ] && bytes=$((8 << 20))
  bg sink srv "$4" "$PODTOOL" sink --listen "0.0.0.0:$SINK_PORT" --delay-us 50
  wait_port mbn-srv 0.0.0.0 "$SINK_PORT"
  local out; out=$(client sink-client "$4" "$PODTOOL" sink-client --to "$5:$SINK_PORT" --bytes "$bytes")
  stop sink
  local ok=0
  grep -q "\"received_by_reader\":$bytes," <<< "$out" && grep -q '"errors":\[\]' <<< "$out" && ok=1
  [ "$ok" = 1 ] || log "slow reader through $1: $out"
  emit l4 "$1" "$2" slow_reader_ok "$3" "$ok"
}

# The paths: how the agent runs, which proxy sits in the node, where the client dials.
# L4_PATHS (space-separated) picks rows; `proxied-relay` is the kernel relay (issue 13
# item 1: --kernel-relay true, 6.9+; below that the agent ignores it and relays as `proxied`);
# `proxied-egress` the opt-in egress relay (--kernel-relay egress: the client's direction onto
# the send path of the proxy's leg, the destination's socket never paired; 6.9+ as well).
read -r -a PATHS <<< "${L4_PATHS:-direct mesh-direct proxied proxied-both proxied-nosk proxied-relay proxied-egress haproxy haproxy-splice envoy}"

path_up() { # path_up PATH NODE-CPUS -> sets TARGET_IP and TARGET_PORTS
  TARGET_IP=$SRV_IP; TARGET_PORTS=("${SRV_PORTS[@]}")
  case $1 in
    direct) config 0 proxied; start_agent "$2" ;;
    mesh-direct) config 1 direct; start_agent "$2" ;;
    proxied) config 1 proxied; start_agent "$2" ;;
    proxied-both) config 1 proxied; start_agent "$2" --skmsg-upstream true ;;
    proxied-nosk) config 1 proxied; start_agent "$2" --skmsg false ;;
    proxied-relay) config 1 proxied; start_agent "$2" --kernel-relay true ;;
    proxied-egress) config 1 proxied; start_agent "$2" --kernel-relay egress ;;
    haproxy) config 0 proxied; start_agent "$2"; start_haproxy "$2"
      TARGET_IP=$NODE_IP; TARGET_PORTS=("${HAPROXY_PORTS[@]}") ;;
    haproxy-splice) config 0 proxied; start_agent "$2"; start_haproxy "$2" splice
      TARGET_IP=$NODE_IP; TARGET_PORTS=("${HAPROXY_PORTS[@]}") ;;
    envoy) config 0 proxied; start_agent "$2"; start_envoy "$2"
      TARGET_IP=$NODE_IP; TARGET_PORTS=("${ENVOY_PORTS[@]}") ;;
    *) die "unknown path $1" ;;
  esac
}

suite_l4() {
  local placement run path cc sc nc
  for placement in $PLACEMENTS; do
    read -r cc sc nc <<< "$(placement_cpus "$placement")"
    # Runs outermost: every path gets each run at about the same moment, so a burst of
    # load on the machine spreads over all paths instead of hitting one.
    for run in $(seq "$RUNS"); do
      for path in "${PATHS[@]}"; do
        log "l4 $placement run $run/$RUNS: $path"
        CUR=$placement-$path
        start_servers "$sc"
        path_up "$path" "$nc"
        measure_latency "$path" "$placement" "$run" "$cc" "$TARGET_IP" "${TARGET_PORTS[0]}"
        measure_bulk "$path" "$placement" "$run" "$cc" "$TARGET_IP" "${TARGET_PORTS[1]}" 1
        measure_bulk "$path" "$placement" "$run" "$cc" "$TARGET_IP" "${TARGET_PORTS[1]}" 8
        measure_crr "$path" "$placement" "$run" "$cc" "$TARGET_IP" "${TARGET_PORTS[2]}"
        case $path in direct|mesh-direct|proxied-relay|proxied-egress) measure_slow_reader "$path" "$placement" "$run" "$cc" "$TARGET_IP" ;; esac
        stop envoy haproxy agent sockperf iperf3 reply
      done
    done
  done
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# The kernel's memlock accounting of every map the agent pinned: one line per map, then
# the total.
map_bytes() { # map_bytes RUN
  local f total=0 b
  for f in "$PIN"/*; do
    # The pin folder also holds the programs' links (link_<program>), which are not maps.
    case "${f##*/}" in link_*) continue ;; esac
    b=$(bpftool -j map show pinned "$f" 2>/dev/null | sed -n 's/.*"bytes_memlock":\([0-9]*\).*/\1/p')
    [ -n "$b" ] || continue
    emit footprint agent proxied "map_bytes:${f##*/}" "$1" "$b"
    total=$((total + b))
  done
  [ "$total" -gt 0 ] || die "no map found under $PIN"
  emit footprint agent proxied bpf_map_bytes "$1" "$total"
}

# 10k held connections are 20k sockets in the agent. Without CAP_SYS_RESOURCE (containers)
# the hard fd limit cannot be raised; then hold as many as it allows and say so.
NOFILE=$(ulimit -Hn); [ "$NOFILE" = unlimited ] && NOFILE=1048576
[ "$NOFILE" -gt 1048576 ] && NOFILE=1048576

suite_footprint() {
  local run conns=$(( (NOFILE - 200) / 2 )); [ "$conns" -gt 10000 ] && conns=10000
  [ "$SMOKE" = 1 ] && conns=200
  local requests=50000; [ "$SMOKE" = 1 ] && requests=2000
  local tck; tck=$(getconf CLK_TCK)
  for run in $(seq "$RUNS"); do
    log "footprint run $run/$RUNS"
    CUR=footprint
    config 1 proxied; start_agent 0
    local pid; pid=$(agent_pid)
    sleep 1
    emit footprint agent proxied idle_rss_kb "$run" "$(rss_kb "$pid")"
    map_bytes "$run"

    bg hold srv 0 prlimit --nofile="$NOFILE:$NOFILE" "$BENCHTOOL" hold --listen "0.0.0.0:$HOLD_PORT"
    wait_port mbn-srv 0.0.0.0 "$HOLD_PORT"
    bg hold-client cli 0 prlimit --nofile="$NOFILE:$NOFILE" "$BENCHTOOL" hold-client --to "$SRV_IP:$HOLD_PORT" --conns "$conns" --secs 600
    for _ in $(seq 600); do grep -q '^open' "$DIR/hold-client.log" && break; kill -0 "$(cat "$DIR/hold-client.pid")" 2>/dev/null || break; sleep 0.1; done
    grep -q "^open $conns\$" "$DIR/hold-client.log" || { cat "$DIR/hold-client.log" "$DIR/agent.log" >&2; die "could not hold $conns connections through the proxy"; }
    emit footprint agent proxied "conns_rss_kb" "$run" "$(rss_kb "$pid")"
    emit footprint agent proxied held_conns "$run" "$conns"
    # The server closes first: the proxy's upstream sockets then close passively and leave
    # no TIME_WAIT on the node's ephemeral ports (10k per run would exhaust them in three
    # runs); the TIME_WAIT lands on the server pod's listening port.
    stop hold
    sleep 1
    stop hold-client

    # CPU time the agent spends per request (keep-alive ping-pong) and per connection.
    start_servers 0
    bg echo srv 0 "$PODTOOL" echo --listen "0.0.0.0:$ECHO_PORT"
    wait_port mbn-srv 0.0.0.0 "$ECHO_PORT"
    local t0 t1 out
    t0=$(cpu_ticks "$pid")
    client pingpong 0 "$BENCHTOOL" pingpong --to "$SRV_IP:$ECHO_PORT" --count "$requests" > /dev/null
    t1=$(cpu_ticks "$pid")
    emit footprint agent proxied cpu_ms_per_10k_requests "$run" "$(awk -v d=$((t1 - t0)) -v n="$requests" -v t="$tck" 'BEGIN {printf "%.2f", d * 1000 / t / n * 10000}')"
    t0=$(cpu_ticks "$pid")
    out=$(client crr 0 "$BENCHTOOL" crr --to "$SRV_IP:${SRV_PORTS[2]}" --secs "$(lat_secs)")
    t1=$(cpu_ticks "$pid")
    emit footprint agent proxied cpu_ms_per_10k_conns "$run" "$(awk -v d=$((t1 - t0)) -v n="$(awk '{print $2}' <<< "$out")" -v t="$tck" 'BEGIN {printf "%.2f", d * 1000 / t / n * 10000}')"
    stop agent sockperf iperf3 reply echo
  done
}

main() {
  case ${1:-} in
    check) check ;;
    clean) clean ;;
    run)
      shift
      [ -n "$AGENT" ] && [ -n "$PODTOOL" ] && [ -n "$BENCHTOOL" ] && [ -n "$ENVOY" ] || die "run it with cargo xtask bench"
      local t; for t in sockperf iperf3 haproxy bpftool curl prlimit taskset timeout "$ENVOY"; do
        command -v "$t" > /dev/null || die "$t is missing (cargo xtask setup installs it)"
      done
      check
      trap 'trap "" INT TERM; exec 2>/dev/null; clean' EXIT
      trap 'exit 130' INT TERM
      node_up
      local s; for s in "$@"; do "suite_$s"; done
      ;;
    *) die "usage: bench.sh check|clean|run SUITE..." ;;
  esac
}
main "$@"
