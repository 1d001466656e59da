#!/usr/bin/env bash
# The L7 suite of `cargo xtask bench` (issue 5, item 3; issue 13) on a simulated node:
# HTTP/1.1 keep-alive (wrk), HTTP/1.1 with a new connection per request (wrk,
# `Connection: close`), HTTP/2 (h2load) and gRPC unary (benchtool grpc) requests/s and
# p50/p99 at a fixed concurrency, to one nginx upstream in the server pod, for each path:
#   direct     an opted-out pod -> the server pod
#   mesh-l4    an enrolled pod -> the server pod's address (captured, plain L4 relay)
#   mesh       an enrolled pod -> a service address (captured, the node proxy's L7 engine)
#   mesh-nosk  `mesh` with the agent restarted with `--skmsg false`: the client leg is plain
#              TCP, as it is for the reverse proxies (like for like)
#   mesh-notel the telemetry cost (issue 12): `mesh` with `--telemetry off` (no Istio
#              series) and with telemetry on (the default, figures under `mesh-tel`),
#              back to back (the agent restarted for each, the order alternating by run),
#              HTTP/1.1 keep-alive only, with the agent's CPU time per request
#   envoy, nginx, haproxy: an opted-out pod -> that reverse proxy on the node's bridge
#              address, forwarding to the server pod
# Every proxy gets one worker per vCPU it may run on (`cpu_count` of the placement's node
# CPUs): the node proxy follows its affinity (`--proxy-workers 0`), Envoy --concurrency N,
# nginx worker_processes N, haproxy nbthread N.
# Appends one line per figure to $RAW:  l7 PATH PLACEMENT METRIC RUN VALUE
# Run it through `cargo xtask bench l7` (builds the binaries, sets the variables), as root.
#
#   bench-l7.sh check | clean | run
#
# Names (distinct from bench.sh's mbn*/10.204, the tests' mt*/10.201, demo 10.202,
# latency 10.203, l7-quick 10.205): netns mb7-cli, mb7-opt, mb7-srv; bridge mb7br
# (10.206.0.1/24); cgroup <cgroup2>/mesh-bench-l7; pins /sys/fs/bpf/mesh-bench-l7;
# scratch /tmp/mesh-bench-l7.
set -euo pipefail

AGENT=${MESH_AGENT_BIN:-}; ENVOY=${ENVOY_BIN:-}; BENCHTOOL=${BENCHTOOL:-}
RUNS=${RUNS:-5}; SECS=${SECS:-2}; SMOKE=${SMOKE:-0}; RAW=${RAW:-/dev/stdout}
PERF_DIR=${PERF_DIR:-}; CUR=
PLACEMENTS=${PLACEMENTS:-1cpu 2cpu}
# Requests in flight: HTTP/1.1 connections; HTTP/2: connections x streams each.
CONNS=${L7_CONNS:-16}; H2_CONNS=4; H2_STREAMS=$((CONNS / H2_CONNS))
# wrk takes whole seconds.
SECS=$(awk -v s="$SECS" 'BEGIN {s = int(s + 0.999); print (s < 1 ? 1 : s)}'); [ "$SMOKE" = 1 ] && SECS=1
# Warm-up requests per path before each measurement (connections, pools, and the node
# proxy's on-demand xDS subscription on the first request).
WARM=2000; [ "$SMOKE" = 1 ] && WARM=200

CG_ROOT=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
CG=$CG_ROOT/mesh-bench-l7; PIN=/sys/fs/bpf/mesh-bench-l7; DIR=/tmp/mesh-bench-l7; BR=mb7br
NODE_IP=10.206.0.1; CLI_IP=10.206.0.2; OPT_IP=10.206.0.3; SRV_IP=10.206.0.4
VIP1=10.96.206.1; VIP2=10.96.206.2; VIP3=10.96.206.3   # services: HTTP/1.1, HTTP/2 (prior knowledge), gRPC
ADMIN=127.0.0.1:15797; XDS=127.0.0.1:15794; ENVOY_ADMIN=127.0.0.1:15796; PROXY_PORT=15701
SRV_H1=8080; SRV_H2=8081; SRV_GRPC=8082
# Reference proxies on the node: HTTP/1.1 port, HTTP/2 port, gRPC port.
ENVOY_PORTS=(17080 17081 17082); NGINX_PORTS=(17180 17181 17182); HAPROXY_PORTS=(17280 17281 17282)
NODE_PORTS=("$PROXY_PORT" "${ADMIN##*:}" "${XDS##*:}" "${ENVOY_ADMIN##*:}" "${ENVOY_PORTS[@]}" "${NGINX_PORTS[@]}" "${HAPROXY_PORTS[@]}")

TAG=bench-l7; NSP=mb7; PODS="cli:2 opt:3 srv:4"; CHECK_SCRATCH=1
# shellcheck source=bench-node.sh
. "$(dirname "${BASH_SOURCE[0]}")/bench-node.sh"

pod_up() { # Service addresses are routed like a cluster's: via the node.
  ip -n "$NSP-$1" route add 10.96.0.0/12 via "$NODE_IP"
}

# nginx wants writable temp paths even when it never buffers to disk.
nginx_common() { # nginx_common NAME WORKERS
  printf 'worker_processes %s;\ndaemon off;\npid %s/%s.nginx-pid;\nerror_log stderr warn;\nevents { worker_connections 4096; }\nhttp {\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n' "$2" "$DIR" "$1"
  local t; for t in client_body proxy fastcgi uwsgi scgi; do printf '  %s_temp_path %s/%s-%s;\n' "$t" "$DIR" "$1" "$t"; done
}

# The upstream for every path: nginx answering a 14-byte body from memory; one worker
# (its vCPU is the server's). gRPC: `benchtool grpc-server` (h2 on one thread) answers
# every unary call, once its request has ended, with one 12-byte message and
# `grpc-status: 0` trailers. (nginx can serve such a file, but answers before the request
# body arrives and resets the stream, which nginx's own `grpc_pass` reports as a 502.)
start_server() { # start_server CPUS
  {
    nginx_common srv 1
    printf '  server { listen %s; location / { return 200 "hello from srv\\n"; } }\n' "$SRV_H1"
    printf '  server { listen %s http2; location / { return 200 "hello from srv\\n"; } }\n}\n' "$SRV_H2"
  } > "$DIR/nginx-srv.conf"
  bg nginx-srv srv "$1" nginx -e stderr -c "$DIR/nginx-srv.conf"
  bg grpc-srv srv "$1" "$BENCHTOOL" grpc-server --listen "0.0.0.0:$SRV_GRPC"
  wait_port mb7-srv 0.0.0.0 "$SRV_H1"; wait_port mb7-srv 0.0.0.0 "$SRV_H2"; wait_port mb7-srv 0.0.0.0 "$SRV_GRPC"
}

config() {
  cat > "$DIR/mesh.yaml" <<YAML
namespaces:
  - { name: a, labels: { mesh-agent.io/dataplane-mode: ambient } }
  - { name: b }
workloads:
  - { name: cli, namespace: a, ip: $CLI_IP, netns: /run/netns/mb7-cli }
  - { name: opt, namespace: a, ip: $OPT_IP, netns: /run/netns/mb7-opt, labels: { mesh-agent.io/dataplane-mode: none } }
  - { name: srv, namespace: b, ip: $SRV_IP, netns: /run/netns/mb7-srv, labels: { app: srv } }
services:
  - { name: srv, namespace: b, vip: $VIP1, ports: [ { port: 80, target_port: $SRV_H1, protocol: http } ], selector: { app: srv } }
  - { name: srv2, namespace: b, vip: $VIP2, ports: [ { port: 80, target_port: $SRV_H2, protocol: http2 } ], selector: { app: srv } }
  - { name: srv3, namespace: b, vip: $VIP3, ports: [ { port: 80, target_port: $SRV_GRPC, protocol: grpc } ], selector: { app: srv } }
YAML
}

start_agent() { # start_agent CPUS [RUN FLAGS...]
  config
  bg agent node "$1" "$AGENT" --log warn run --config "$DIR/mesh.yaml" --pin-path "$PIN" --cgroup "$CG" \
    --proxy-address "$NODE_IP:$PROXY_PORT" --admin-address "$ADMIN" --xds-listen "$XDS" "${@:2}"
  for _ in $(seq 100); do curl -sf "http://$ADMIN/ready" > /dev/null 2>&1 && return; sleep 0.05; done
  cat "$DIR/agent.log" >&2; die "the agent did not become ready"
}

start_nginx() { # start_nginx CPUS
  {
    nginx_common proxy "$(cpu_count "$1")"
    printf '  upstream h1 { server %s:%s; keepalive 64; keepalive_requests 10000000; }\n' "$SRV_IP" "$SRV_H1"
    printf '  upstream grpc { server %s:%s; keepalive 64; keepalive_requests 10000000; }\n' "$SRV_IP" "$SRV_GRPC"
    # nginx proxies HTTP to HTTP/1.1 upstreams only: its HTTP/2 front talks HTTP/1.1
    # behind. gRPC goes over HTTP/2 end to end (grpc_pass).
    local p; for p in "${NGINX_PORTS[0]}" "${NGINX_PORTS[1]} http2"; do
      printf '  server { listen %s:%s; location / { proxy_pass http://h1; proxy_http_version 1.1; proxy_set_header Connection ""; } }\n' "$NODE_IP" "$p"
    done
    printf '  server { listen %s:%s http2; location / { grpc_pass grpc://grpc; } }\n' "$NODE_IP" "${NGINX_PORTS[2]}"
    printf '}\n'
  } > "$DIR/nginx-proxy.conf"
  bg nginx-proxy ref "$1" nginx -e stderr -c "$DIR/nginx-proxy.conf"
  local p; for p in "${NGINX_PORTS[@]}"; do wait_port node "$NODE_IP" "$p"; done
}

start_haproxy() { # start_haproxy CPUS
  cat > "$DIR/haproxy.cfg" <<CFG
global
  nbthread $(cpu_count "$1")
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend h1
  bind $NODE_IP:${HAPROXY_PORTS[0]}
  default_backend b1
frontend h2
  bind $NODE_IP:${HAPROXY_PORTS[1]} proto h2
  default_backend b2
frontend grpc
  bind $NODE_IP:${HAPROXY_PORTS[2]} proto h2
  default_backend b3
backend b1
  server s $SRV_IP:$SRV_H1
backend b2
  server s $SRV_IP:$SRV_H2 proto h2
backend b3
  server s $SRV_IP:$SRV_GRPC proto h2
CFG
  bg haproxy ref "$1" haproxy -db -f "$DIR/haproxy.cfg"
  local p; for p in "${HAPROXY_PORTS[@]}"; do wait_port node "$NODE_IP" "$p"; done
}

start_envoy() { # start_envoy CPUS
  local i
  {
    printf 'admin:\n  address: { socket_address: { address: %s, port_value: %s } }\nstatic_resources:\n  listeners:\n' "${ENVOY_ADMIN%%:*}" "${ENVOY_ADMIN##*:}"
    for i in 0 1 2; do
      printf '  - name: l%s\n    address: { socket_address: { address: %s, port_value: %s } }\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: l%s\n          codec_type: AUTO\n          route_config:\n            virtual_hosts:\n            - { name: all, domains: ["*"], routes: [ { match: { prefix: / }, route: { cluster: c%s } } ] }\n          http_filters:\n          - name: envoy.filters.http.router\n            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }\n' \
        "$i" "$NODE_IP" "${ENVOY_PORTS[$i]}" "$i" "$i"
    done
    printf '  clusters:\n'
    for i in 0 1 2; do
      local port=$SRV_H1 proto=""
      if [ "$i" != 0 ]; then
        port=$SRV_H2; [ "$i" = 2 ] && port=$SRV_GRPC
        proto='    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: { http2_protocol_options: {} }\n'
      fi
      printf '  - name: c%s\n    type: STATIC\n    connect_timeout: 5s\n'"$proto"'    load_assignment:\n      cluster_name: c%s\n      endpoints:\n      - lb_endpoints:\n        - endpoint: { address: { socket_address: { address: %s, port_value: %s } } }\n' \
        "$i" "$i" "$SRV_IP" "$port"
    done
  } > "$DIR/envoy.yaml"
  bg envoy ref "$1" "$ENVOY" -c "$DIR/envoy.yaml" --concurrency "$(cpu_count "$1")" --log-level warn --disable-hot-restart
  local p; for p in "${ENVOY_PORTS[@]}"; do wait_port node "$NODE_IP" "$p"; done
}

# --- measurements ----------------------------------------------------------------------

emit() { echo "$*" >> "$RAW"; }

# Every client fails loudly: a path that breaks must not turn into a missing figure. One
# that stalls (no result within CLIENT_TIMEOUT s: `timeout` ends it) is run again, at most
# twice, and said in the log; a third stall ends the run.
CLIENT_TIMEOUT=$((SECS * 5 + 60))
client() { # client NAME POD CPUS CMD... -> stdout of CMD
  local name=$1 pod=$2 out perf_pid= rec; shift 2
  if [ -n "$PERF_DIR" ]; then
    rec=$PERF_DIR/$CUR-$name.data
    perf record -q -C 0 -g -o "$rec" > /dev/null 2>&1 &
    perf_pid=$!; echo "$perf_pid" > "$DIR/perf.pid"; sleep 0.5
  fi
  # PERF_STAT=FILE (by hand): the agent's CPU time, instructions and context switches over
  # each measurement on a mesh path, one line per measurement appended to FILE (robust
  # where wall-clock figures are not: per request, they do not depend on the load).
  local stat_pid=
  if [ -n "${PERF_STAT:-}" ] && [[ $CUR == *-mesh* ]]; then
    perf stat -x, -e task-clock,instructions,context-switches -p "$(cat "$DIR/agent.pid")" -o "$DIR/perf-stat.txt" > /dev/null 2>&1 &
    stat_pid=$!; sleep 0.2
  fi
  local attempt rc
  for attempt in 1 2 3; do
    rc=0; out=$(in_cg "$pod" "$1" timeout -k 5 "$CLIENT_TIMEOUT" "${@:2}" 2> "$DIR/$name.err") || rc=$?
    # 124: `timeout` stopped it; 137: it had to kill it.
    [ "$rc" = 124 ] || [ "$rc" = 137 ] || break
    log "$name stalled (no result in $CLIENT_TIMEOUT s; attempt $attempt of 3): ${*:2}"
  done
  if [ "$rc" != 0 ]; then
    echo "$out" >&2; cat "$DIR/$name.err" >&2; die "$name failed: $*"
  fi
  if [ -n "$stat_pid" ]; then
    kill -INT "$stat_pid"; wait "$stat_pid" 2>/dev/null || true
    echo "$CUR $name $(grep -v '^#' "$DIR/perf-stat.txt" | awk -F, 'NF > 2 {printf "%s=%s ", $3, $1}') out: $(tr '\n' ' ' <<< "$out" | grep -o 'Requests/sec: *[0-9.]*\|finished in [^,]*, [0-9.]* req/s\|rps [0-9.]*')" >> "$PERF_STAT"
  fi
  if [ -n "$perf_pid" ]; then
    kill -TERM "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; rm -f "$DIR/perf.pid"
    { perf report -i "$rec" --no-children --sort comm -g none --stdio
      perf report -i "$rec" --no-children --sort comm,dso,sym -g none --percent-limit 0.3 --stdio
    } 2> /dev/null | grep -v '^$' > "${rec%.data}.txt" || true
  fi
  echo "$out"
}

# wrk's latencies come as 812.00us, 1.23ms or 1.02s.
to_us() { awk '{v = $1 + 0; if ($1 ~ /us$/) print v; else if ($1 ~ /ms$/) print v * 1000; else if ($1 ~ /s$/) print v * 1000000; else print v}'; }

measure_h1() { # measure_h1 PATH PLACEMENT RUN POD CPU URL
  (in_cg "$4" "$5" timeout -k 5 "$CLIENT_TIMEOUT" h2load --h1 -t1 -c"$CONNS" -n "$WARM" "$6") > /dev/null 2>&1 || true
  # AGENT_CPU=1: the agent's CPU time (utime + stime, all threads) over the measurement.
  local pid= t0=; [ -n "${AGENT_CPU:-}" ] && pid=$(cat "$DIR/agent.pid") && t0=$(cpu_ticks "$pid")
  local out; out=$(client wrk "$4" "$5" wrk -t1 -c"$CONNS" -d"${SECS}s" --latency "$6")
  local t1=; [ -n "$pid" ] && t1=$(cpu_ticks "$pid")
  if grep -q "Non-2xx\|Socket errors" <<< "$out"; then echo "$out" >&2; die "HTTP/1.1 through $1 had errors"; fi
  local rps p50 p99
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<< "$out")
  p50=$(awk '$1 == "50%" {print $2}' <<< "$out" | to_us); p99=$(awk '$1 == "99%" {print $2}' <<< "$out" | to_us)
  [ -n "$rps" ] && [ -n "$p50" ] && [ -n "$p99" ] || { echo "$out" >&2; die "cannot read wrk's output ($1)"; }
  emit l7 "$1" "$2" h1_rps "$3" "$rps"; emit l7 "$1" "$2" h1_p50_us "$3" "$p50"; emit l7 "$1" "$2" h1_p99_us "$3" "$p99"
  if [ -n "$pid" ]; then
    emit l7 "$1" "$2" h1_cpu_us "$3" "$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v r="$rps" -v s="$SECS" 'BEGIN {printf "%.2f", d / hz * 1e6 / (r * s)}')"
  fi
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# HTTP/1.1 without keep-alive: every request on a new connection (`Connection: close`;
# the server side closes, so TIME_WAIT stays off the client's ports).
measure_h1close() { # measure_h1close PATH PLACEMENT RUN POD CPU URL
  (in_cg "$4" "$5" timeout -k 5 "$CLIENT_TIMEOUT" h2load --h1 -t1 -c"$CONNS" -n "$WARM" -H 'Connection: close' "$6") > /dev/null 2>&1 || true
  local out; out=$(client wrk-close "$4" "$5" wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -H 'Connection: close' "$6")
  if grep -q "Non-2xx\|Socket errors" <<< "$out"; then echo "$out" >&2; die "HTTP/1.1 without keep-alive through $1 had errors"; fi
  local rps p50 p99
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<< "$out")
  p50=$(awk '$1 == "50%" {print $2}' <<< "$out" | to_us); p99=$(awk '$1 == "99%" {print $2}' <<< "$out" | to_us)
  [ -n "$rps" ] && [ -n "$p50" ] && [ -n "$p99" ] || { echo "$out" >&2; die "cannot read wrk's output ($1, no keep-alive)"; }
  emit l7 "$1" "$2" h1c_rps "$3" "$rps"; emit l7 "$1" "$2" h1c_p50_us "$3" "$p50"; emit l7 "$1" "$2" h1c_p99_us "$3" "$p99"
}

# gRPC unary: benchtool's h2 client, the HTTP/2 rows' concurrency (connections x calls).
measure_grpc() { # measure_grpc PATH PLACEMENT RUN POD CPU URL
  local hostport=${6#http://}; hostport=${hostport%/}
  local to=$hostport; [ "${to##*:}" = "$to" ] && to=$to:80
  local out; out=$(client grpc "$4" "$5" "$BENCHTOOL" grpc --to "$to" --authority "$hostport" \
    --conns "$H2_CONNS" --streams "$H2_STREAMS" --secs "$SECS" --warm "$WARM")
  local errors rps p50 p99
  read -r errors rps p50 p99 <<< "$(awk '{for (i = 1; i < NF; i++) v[$i] = $(i + 1); print v["errors"], v["rps"], v["p50_us"], v["p99_us"]}' <<< "$out")"
  [ "$errors" = 0 ] || { echo "$out" >&2; die "gRPC through $1 had errors"; }
  [ -n "$rps" ] && [ -n "$p50" ] && [ -n "$p99" ] || { echo "$out" >&2; die "cannot read benchtool grpc's output ($1)"; }
  emit l7 "$1" "$2" grpc_rps "$3" "$rps"; emit l7 "$1" "$2" grpc_p50_us "$3" "$p50"; emit l7 "$1" "$2" grpc_p99_us "$3" "$p99"
}

measure_h2() { # measure_h2 PATH PLACEMENT RUN POD CPU URL
  local h2=(h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS")
  (in_cg "$4" "$5" timeout -k 5 "$CLIENT_TIMEOUT" "${h2[@]}" -n "$WARM" "$6") > /dev/null 2>&1 || true
  local lat=$DIR/h2load.log; rm -f "$lat"
  local out; out=$(client h2load "$4" "$5" "${h2[@]}" -D "$SECS" --log-file="$lat" "$6")
  # requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
  local failed; failed=$(awk '/^requests:/ {print $10 + $12 + $14}' <<< "$out")
  [ "$failed" = 0 ] || { echo "$out" >&2; die "HTTP/2 through $1 had errors"; }
  local rps p50 p99
  rps=$(sed -n 's/^finished in .*, \([0-9.]*\) req\/s.*/\1/p' <<< "$out")
  # --log-file: start time, status, request duration (us) per request.
  read -r p50 p99 <<< "$(awk '{print $3}' "$lat" | sort -n | awk '{v[NR] = $1} END {if (NR) print v[int(NR * 0.5) + 1], v[int(NR * 0.99) + 1]}')"
  [ -n "$rps" ] && [ -n "$p50" ] && [ -n "$p99" ] || { echo "$out" >&2; die "cannot read h2load's output ($1)"; }
  emit l7 "$1" "$2" h2_rps "$3" "$rps"; emit l7 "$1" "$2" h2_p50_us "$3" "$p50"; emit l7 "$1" "$2" h2_p99_us "$3" "$p99"
}

# L7_PATHS: a subset, for runs by hand (the report wants them all).
read -r -a PATHS <<< "${L7_PATHS:-direct mesh-l4 mesh mesh-nosk mesh-notel envoy nginx haproxy}"

target() { # target PATH PROTO(1|2|3: gRPC) -> "POD URL"
  local i=$(($2 - 1)) srv_port=$SRV_H1 vip=$VIP1
  [ "$2" = 2 ] && srv_port=$SRV_H2 && vip=$VIP2
  [ "$2" = 3 ] && srv_port=$SRV_GRPC && vip=$VIP3
  case $1 in
    direct) echo "opt http://$SRV_IP:$srv_port/" ;;
    mesh-l4) echo "cli http://$SRV_IP:$srv_port/" ;;
    mesh|mesh-nosk|mesh-notel) echo "cli http://$vip/" ;;
    envoy) echo "opt http://$NODE_IP:${ENVOY_PORTS[$i]}/" ;;
    nginx) echo "opt http://$NODE_IP:${NGINX_PORTS[$i]}/" ;;
    haproxy) echo "opt http://$NODE_IP:${HAPROXY_PORTS[$i]}/" ;;
    *) die "unknown path $1" ;;
  esac
}

suite_l7() {
  local placement run path cc sc nc pod url
  for placement in $PLACEMENTS; do
    read -r cc sc nc <<< "$(placement_cpus "$placement")"
    for run in $(seq "$RUNS"); do
      # Every proxy runs for the whole run (idle while another path is measured), so each
      # path meets the same machine.
      start_server "$sc"; start_agent "$nc"; start_envoy "$nc"; start_nginx "$nc"; start_haproxy "$nc"
      for path in "${PATHS[@]}"; do
        log "l7 $placement run $run/$RUNS: $path"
        CUR=$placement-$path
        read -r pod url <<< "$(target "$path" 1)"
        if [ "$path" = mesh-notel ]; then
          local tel order="off on"; [ $((run % 2)) = 0 ] && order="on off"
          for tel in $order; do
            stop agent; start_agent "$nc" --telemetry "$tel"
            AGENT_CPU=1 measure_h1 "$([ "$tel" = off ] && echo mesh-notel || echo mesh-tel)" "$placement" "$run" "$pod" "$cc" "$url"
          done
          stop agent; start_agent "$nc"
          continue
        fi
        # Like for like: the agent restarted without sk_msg for this path only.
        if [ "$path" = mesh-nosk ]; then stop agent; start_agent "$nc" --skmsg false; fi
        measure_h1 "$path" "$placement" "$run" "$pod" "$cc" "$url"
        measure_h1close "$path" "$placement" "$run" "$pod" "$cc" "$url"
        read -r pod url <<< "$(target "$path" 2)"
        measure_h2 "$path" "$placement" "$run" "$pod" "$cc" "$url"
        read -r pod url <<< "$(target "$path" 3)"
        measure_grpc "$path" "$placement" "$run" "$pod" "$cc" "$url"
        if [ "$path" = mesh-nosk ]; then stop agent; start_agent "$nc"; fi
      done
      stop haproxy nginx-proxy envoy agent grpc-srv nginx-srv
    done
  done
}

main() {
  case ${1:-} in
    check) check ;;
    clean) clean ;;
    run)
      [ -n "$AGENT" ] && [ -n "$ENVOY" ] && [ -n "$BENCHTOOL" ] || die "run it with cargo xtask bench l7"
      local t; for t in wrk h2load nginx haproxy curl taskset timeout "$ENVOY" "$BENCHTOOL"; do
        command -v "$t" > /dev/null || die "$t is missing (cargo xtask setup installs it)"
      done
      check
      trap 'trap "" INT TERM; exec 2>/dev/null; clean' EXIT
      trap 'exit 130' INT TERM
      node_up
      suite_l7
      ;;
    *) die "usage: bench-l7.sh check|clean|run" ;;
  esac
}
main "$@"
