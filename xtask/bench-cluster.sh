#!/usr/bin/env bash
# The `cluster` suite of `cargo xtask bench` (issue 11): pod -> pod across two simulated
# nodes, plain routed TCP against our HBONE tunnel and against Envoy's. Appends one line
# per measurement to $RAW:
#   cluster path placement metric run value
# and xtask (xtask/src/bench/cluster.rs) turns those lines into JSON and Markdown. Run it
# through `cargo xtask bench cluster` (which builds the binaries, holds
# /tmp/mesh-bench.lock and sets the variables below), as root.
#
#   bench-cluster.sh check      refuse (exit 1) if an earlier run left something behind
#   bench-cluster.sh clean      remove what an earlier run left behind
#   bench-cluster.sh run        measure
#
# Layout (the tests' SimCluster, tests/src/cluster.rs, with names of its own):
#
#   netns mbc-ul: bridge br0 (the underlay), ports n0, n1
#   netns mbc-n0: eth0 10.226.0.1/24, br0 10.227.0.1/24 (pods' gateway), route to
#                 10.228.0.0/24 via 10.226.0.2; mesh-agent (cgroup <cgroup2>/mesh-bench-cluster/n0,
#                 pins /sys/fs/bpf/mesh-bench-cluster-n0); Envoy HBONE client (cgroup .../n0/ref)
#   netns mbc-n1: eth0 10.226.0.2/24, br0 10.228.0.1/24, route to 10.227.0.0/24 via
#                 10.226.0.1; mesh-agent (.../n1); Envoy HBONE server (.../n1/ref)
#   netns mbc-n0-cli 10.227.0.2 (cgroup .../n0/cli): the clients
#   netns mbc-n1-srv 10.228.0.2 (cgroup .../n1/srv): sockperf, iperf3, benchtool reply
#
# Agents and everything else enter a namespace with `nsenter --net=` (not `ip netns exec`,
# which remounts /sys and would hide bpffs and the cgroup mount from the agent), after
# writing their shell's pid into their cgroup's cgroup.procs. Scratch: /tmp/mesh-bench-cluster.
set -euo pipefail

AGENT=${MESH_AGENT_BIN:-}; BENCHTOOL=${BENCHTOOL:-}; ENVOY=${ENVOY_BIN:-}
RUNS=${RUNS:-5}; SECS=${SECS:-2}; SMOKE=${SMOKE:-0}; RAW=${RAW:-/dev/stdout}
PLACEMENTS=${PLACEMENTS:-1cpu 2cpu}
# A/B by hand: MESH_AGENT_BIN_B, another agent binary, adds the path `mesh-tunnel-b` (the
# tunnel through that binary's agents), measured in the same runs as the others.
# CLUSTER_PATHS: the paths to measure (default all). PERF_DIR (`--perf`): a
# `perf record -g` of the client's CPU during each measurement, one file each.
AGENT_B=${MESH_AGENT_BIN_B:-}; PERF_DIR=${PERF_DIR:-}; CUR=

CG_ROOT=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
CG=$CG_ROOT/mesh-bench-cluster; PIN=/sys/fs/bpf/mesh-bench-cluster; DIR=/tmp/mesh-bench-cluster
NSP=mbc; NODES=(n0 n1); UL_NET=10.226.0; POD_NET=(10.227.0 10.228.0)
CLI_IP=10.227.0.2; SRV_IP=10.228.0.2
# Servers in the server pod: sockperf, iperf3, benchtool reply. Envoy's HBONE client
# listens on node 0's pod gateway (ENVOY_CLI_PORTS) and tunnels to Envoy's HBONE server on
# node 1's underlay address (ENVOY_SRV_PORTS), one listener per server.
SRV_PORTS=(11111 5201 8081); ENVOY_CLI_PORTS=(22111 22201 22081); ENVOY_SRV_PORTS=(25111 25201 25081)
ADMIN=127.0.0.1:15020
TRUST_DOMAIN=cluster.local

log() { echo "cluster: $*" >&2; }
die() { echo "cluster: error: $*" >&2; exit 1; }
emit() { echo "cluster $*" >> "$RAW"; }
ns() { echo "/run/netns/$NSP-$1"; }

# --- leftovers -------------------------------------------------------------------------

leftovers() {
  local l=() n p
  ip netns list 2>/dev/null | grep -qE "^$NSP-" && l+=("network namespaces: $(ip netns list | grep -E "^$NSP-" | awk '{print $1}' | paste -sd' ')")
  [ -d "$CG" ] && l+=("cgroup $CG (processes: $(find "$CG" -name cgroup.procs -exec cat {} + 2>/dev/null | paste -sd' '))")
  for n in "${NODES[@]}"; do
    [ -e "$PIN-$n" ] && l+=("bpffs pins $PIN-$n")
    p=$(pgrep -f -- "--pin-path $PIN-$n" | paste -sd' ' || true)
    [ -n "$p" ] && l+=("a mesh-agent on $PIN-$n (pid $p)")
  done
  [ -d "$DIR" ] && l+=("scratch directory $DIR")
  printf '%s\n' "${l[@]+"${l[@]}"}"
}

check() {
  local l; l=$(leftovers)
  if [ -n "$l" ]; then
    echo "cluster: refusing to start: an earlier run (or something else) holds what this one needs:" >&2
    sed 's/^/  - /' <<< "$l" >&2
    echo "cluster: remove them with \`cargo xtask bench --clean\`" >&2
    exit 1
  fi
}

# Kills only what this script started: the pids it wrote down and processes in its cgroups.
clean() {
  local f n
  for f in "$DIR"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  procs() { find "$CG" -name cgroup.procs -exec cat {} + 2>/dev/null; }
  if [ -d "$CG" ]; then
    procs | xargs -r kill 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(procs)" ] && break; sleep 0.1; done
    procs | xargs -r kill -9 2>/dev/null || true
    sleep 0.2
  fi
  for n in "${NODES[@]}"; do ip netns del "$NSP-$n" 2>/dev/null || true; done
  ip netns del "$NSP-n0-cli" 2>/dev/null || true
  ip netns del "$NSP-n1-srv" 2>/dev/null || true
  ip netns del "$NSP-ul" 2>/dev/null || true
  # Deepest first: a cgroup goes once it has no children.
  [ -d "$CG" ] && find "$CG" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  for n in "${NODES[@]}"; do
    # The agent removes its pins on stop; a killed one leaves them (and its xDS socket folder).
    [ -e "$PIN-$n" ] && rm -rf "$PIN-$n" 2>/dev/null || true
    [ -d "/run/mesh-agent/mesh-bench-cluster-$n" ] && rm -rf "/run/mesh-agent/mesh-bench-cluster-$n" 2>/dev/null || true
  done
  [ -d "$DIR" ] && rm -rf "$DIR"
  return 0
}

# --- the simulated cluster -------------------------------------------------------------

sysctls() { # sysctls NETNS: tens of thousands of short connections per run need ports
  nsenter --net="$1" sysctl -qw net.ipv4.ip_local_port_range="10000 65000" net.ipv4.tcp_tw_reuse=1
}

pod_add() { # pod_add NODE-INDEX NAME HOST
  local i=$1 name=$2 h=$3 node=$NSP-n$1 pns=$NSP-n$1-$2
  ip netns add "$pns"
  ip -n "$node" link add "v$h" type veth peer name eth0 netns "$pns"
  ip -n "$node" link set "v$h" master br0 up
  ip -n "$pns" addr add "${POD_NET[$i]}.$h/24" dev eth0
  ip -n "$pns" link set eth0 up; ip -n "$pns" link set lo up
  ip -n "$pns" route add default via "${POD_NET[$i]}.1"
  mkdir -p "$CG/n$i/$name"
  sysctls "$(ns "n$i-$name")"
}

cluster_up() {
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
  mkdir -p "$DIR" "$CG"
  ip netns add "$NSP-ul"
  ip -n "$NSP-ul" link set lo up
  ip -n "$NSP-ul" link add br0 type bridge; ip -n "$NSP-ul" link set br0 up
  local i n
  for i in 0 1; do
    n=$NSP-n$i
    ip netns add "$n"; ip -n "$n" link set lo up
    ip -n "$NSP-ul" link add "n$i" type veth peer name eth0 netns "$n"
    ip -n "$NSP-ul" link set "n$i" master br0 up
    ip -n "$n" addr add "$UL_NET.$((i + 1))/24" dev eth0; ip -n "$n" link set eth0 up
    ip -n "$n" link add br0 type bridge; ip -n "$n" addr add "${POD_NET[$i]}.1/24" dev br0
    ip -n "$n" link set br0 up
    nsenter --net="$(ns "n$i")" sysctl -qw net.ipv4.ip_forward=1
    sysctls "$(ns "n$i")"
    mkdir -p "$CG/n$i/ref" "$DIR/n$i"
  done
  # Routes between the pod ranges through the nodes' underlay addresses (a routing CNI).
  ip -n "$NSP-n0" route add "${POD_NET[1]}.0/24" via "$UL_NET.2"
  ip -n "$NSP-n1" route add "${POD_NET[0]}.0/24" via "$UL_NET.1"
  pod_add 0 cli 2
  pod_add 1 srv 2
  # One root for both nodes, in Istio's plug-in layout: identities verify across nodes.
  local out; out=$("$AGENT" ca init --dir "$DIR/ca" 2>&1) || die "mesh-agent ca init: $out"
  envoy_certs
}

# in_cg CGROUP NETNS CPUS CMD...: CMD in the cgroup (a folder below $CG) and the netns,
# pinned. It execs, so call it in a subshell (`&` or `$(...)`): the pid is then CMD's own.
in_cg() {
  local cg=$CG/$1 netns=$2 cpus=$3; shift 3
  exec sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$cg" \
    nsenter --net="$netns" taskset -c "$cpus" "$@"
}

bg() { # bg NAME CGROUP NETNS CPUS CMD...: in the background; $DIR/NAME.pid, $DIR/NAME.log
  local name=$1; shift
  in_cg "$@" > "$DIR/$name.log" 2>&1 &
  echo $! > "$DIR/$name.pid"
}

stop() { # stop NAME...
  local n p
  for n in "$@"; do
    [ -f "$DIR/$n.pid" ] || continue
    p=$(cat "$DIR/$n.pid"); rm -f "$DIR/$n.pid"
    kill "$p" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
}

wait_port() { # wait_port NETNS IP PORT
  for _ in $(seq 200); do
    nsenter --net="$1" ss -Hltn "sport = :$3" | grep -q "$2:$3\|\*:$3\|0.0.0.0:$3" && return 0
    sleep 0.05
  done
  tail -n 5 "$DIR"/*.log >&2
  die "nothing listens on $2:$3 ($1)"
}

# --- agents ----------------------------------------------------------------------------

config() { # config ENROLLED(0/1): the one file both nodes read, every workload with its node
  local label="{}"; [ "$1" = 1 ] && label="{ mesh-agent.io/dataplane-mode: ambient }"
  cat > "$DIR/mesh.yaml.tmp" << EOF
namespaces:
  - { name: a, labels: $label }
  - { name: b, labels: $label }
workloads:
  - { name: cli, namespace: a, ip: $CLI_IP, netns: $(ns n0-cli), node: n0, service_account: client }
  - { name: srv, namespace: b, ip: $SRV_IP, netns: $(ns n1-srv), node: n1, service_account: server }
EOF
  mv "$DIR/mesh.yaml.tmp" "$DIR/mesh.yaml"
}

admin_get() { # admin_get NODE PATH
  nsenter --net="$(ns "$1")" curl -sf --max-time 2 "http://$ADMIN$2"
}

start_agents() { # start_agents CPUS-N0 CPUS-N1 ENROLLED [AGENT-BINARY]
  local i cpus=("$1" "$2") enrolled=$3 bin=${4:-$AGENT}
  for i in 0 1; do
    bg "agent-n$i" "n$i" "$(ns "n$i")" "${cpus[$i]}" env MESH_LOG=warn "$bin" run \
      --config "$DIR/mesh.yaml" --pin-path "$PIN-n$i" --cgroup "$CG/n$i" \
      --proxy-address "${POD_NET[$i]}.1:15001" --node-name "n$i" --ca-dir "$DIR/ca"
  done
  for i in 0 1; do
    local ok=0
    for _ in $(seq 200); do admin_get "n$i" /ready > /dev/null 2>&1 && { ok=1; break; }; sleep 0.05; done
    [ "$ok" = 1 ] || { cat "$DIR/agent-n$i.log" >&2; die "the agent of node n$i did not become ready"; }
  done
  [ "$enrolled" = 1 ] || return 0
  # Both nodes must know the server workload and its identity before the first flow.
  for i in 0 1; do
    ok=0
    for _ in $(seq 200); do
      admin_get "n$i" /config_dump 2> /dev/null | grep -q "spiffe://$TRUST_DOMAIN/ns/b/sa/server" && { ok=1; break; }
      sleep 0.05
    done
    [ "$ok" = 1 ] || { cat "$DIR/agent-n$i.log" >&2; die "node n$i's agent never served the server workload"; }
  done
}

# --- Envoy as HBONE client (node 0) and server (node 1) --------------------------------

# Leaf certificates from the cluster's CA for both Envoys (SPIFFE URI SANs, as ours).
envoy_certs() {
  local d=$DIR/ca who
  for who in envoy-client envoy-server; do
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout "$d/$who.key" -subj "/O=mesh-bench/CN=$who" -out "$d/$who.csr" 2> /dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=URI:spiffe://%s/ns/bench/sa/%s\n' \
      "$TRUST_DOMAIN" "$who" > "$d/$who.ext"
    openssl x509 -req -in "$d/$who.csr" -CA "$d/ca-cert.pem" -CAkey "$d/ca-key.pem" \
      -CAcreateserial -days 2 -sha256 -extfile "$d/$who.ext" -out "$d/$who.leaf.pem" 2> /dev/null
    # Leaf, then the signing CA's chain (cert-chain.pem: ca-cert up to the root).
    cat "$d/$who.leaf.pem" "$d/cert-chain.pem" > "$d/$who.pem"
    openssl verify -CAfile "$d/root-cert.pem" -untrusted "$d/cert-chain.pem" "$d/$who.leaf.pem" > /dev/null \
      || die "the minted $who certificate does not verify against root-cert.pem"
  done
}

TLS_PARAMS='tls_params: { tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }'

start_envoy_client() { # start_envoy_client CPUS
  local i d=$DIR/ca
  {
    printf 'static_resources:\n  listeners:\n'
    for i in 0 1 2; do
      cat << EOF
  - name: l$i
    address: { socket_address: { address: ${POD_NET[0]}.1, port_value: ${ENVOY_CLI_PORTS[$i]} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: l$i
          cluster: hbone$i
          tunneling_config: { hostname: "$SRV_IP:${SRV_PORTS[$i]}" }
EOF
    done
    printf '  clusters:\n'
    for i in 0 1 2; do
      cat << EOF
  - name: hbone$i
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: hbone$i
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: $UL_NET.2, port_value: ${ENVOY_SRV_PORTS[$i]} } } }
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          $TLS_PARAMS
          alpn_protocols: [h2]
          tls_certificates:
          - certificate_chain: { filename: $d/envoy-client.pem }
            private_key: { filename: $d/envoy-client.key }
          validation_context:
            trusted_ca: { filename: $d/root-cert.pem }
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: { exact: "spiffe://$TRUST_DOMAIN/ns/bench/sa/envoy-server" }
EOF
    done
  } > "$DIR/envoy-client.yaml"
  bg envoy-client n0/ref "$(ns n0)" "$1" "$ENVOY" -c "$DIR/envoy-client.yaml" --concurrency 1 \
    --log-level warn --disable-hot-restart
  for i in 0 1 2; do wait_port "$(ns n0)" "${POD_NET[0]}.1" "${ENVOY_CLI_PORTS[$i]}"; done
}

start_envoy_server() { # start_envoy_server CPUS
  local i d=$DIR/ca
  {
    printf 'static_resources:\n  listeners:\n'
    for i in 0 1 2; do
      cat << EOF
  - name: hbone$i
    address: { socket_address: { address: $UL_NET.2, port_value: ${ENVOY_SRV_PORTS[$i]} } }
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            $TLS_PARAMS
            alpn_protocols: [h2]
            tls_certificates:
            - certificate_chain: { filename: $d/envoy-server.pem }
              private_key: { filename: $d/envoy-server.key }
            validation_context:
              trusted_ca: { filename: $d/root-cert.pem }
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: { exact: "spiffe://$TRUST_DOMAIN/ns/bench/sa/envoy-client" }
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hbone$i
          codec_type: HTTP2
          http2_protocol_options: { allow_connect: true }
          upgrade_configs: [{ upgrade_type: CONNECT }]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { connect_matcher: {} }
                route:
                  cluster: s$i
                  upgrade_configs: [{ upgrade_type: CONNECT, connect_config: {} }]
EOF
    done
    printf '  clusters:\n'
    for i in 0 1 2; do
      cat << EOF
  - name: s$i
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: s$i
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: $SRV_IP, port_value: ${SRV_PORTS[$i]} } } }
EOF
    done
  } > "$DIR/envoy-server.yaml"
  bg envoy-server n1/ref "$(ns n1)" "$1" "$ENVOY" -c "$DIR/envoy-server.yaml" --concurrency 1 \
    --log-level warn --disable-hot-restart
  for i in 0 1 2; do wait_port "$(ns n1)" "$UL_NET.2" "${ENVOY_SRV_PORTS[$i]}"; done
}

# --- measurements ----------------------------------------------------------------------

start_servers() { # start_servers CPUS
  local n1s; n1s=$(ns n1-srv)
  bg sockperf n1/srv "$n1s" "$1" sockperf server --tcp -i 0.0.0.0 -p "${SRV_PORTS[0]}"
  bg iperf3 n1/srv "$n1s" "$1" iperf3 -s -p "${SRV_PORTS[1]}"
  bg reply n1/srv "$n1s" "$1" "$BENCHTOOL" reply --listen "0.0.0.0:${SRV_PORTS[2]}"
  local p; for p in "${SRV_PORTS[@]}"; do wait_port "$n1s" 0.0.0.0 "$p"; done
}

# Every client fails loudly: a path that breaks must not turn into a missing figure. One
# that stalls (no result within CLIENT_TIMEOUT s: `timeout` ends it) is run once more, and
# said in the log; a second stall ends the run.
CLIENT_TIMEOUT=$(awk -v s="$SECS" 'BEGIN {printf "%d", s * 5 + 60}')
client() { # client NAME CPUS CMD... -> stdout of CMD
  local name=$1 cpus=$2 out perf_pid=; shift 2
  if [ -n "$PERF_DIR" ]; then
    # The client's CPU: in the one-vCPU placement all of the path's work is there.
    perf record -q -C "$cpus" -g -o "$PERF_DIR/$CUR-$name.data" > /dev/null 2>&1 &
    perf_pid=$!; echo "$perf_pid" > "$DIR/perf.pid"; sleep 0.5
  fi
  local attempt rc
  for attempt in 1 2; do
    rc=0
    out=$(in_cg n0/cli "$(ns n0-cli)" "$cpus" timeout -k 5 "$CLIENT_TIMEOUT" "$@" 2> "$DIR/$name.err") || rc=$?
    # 124: `timeout` stopped it; 137: it had to kill it.
    [ "$rc" = 124 ] || [ "$rc" = 137 ] || break
    log "$name stalled (no result in $CLIENT_TIMEOUT s; attempt $attempt of 2): $*"
  done
  if [ "$rc" != 0 ]; then
    echo "$out" >&2; cat "$DIR/$name.err" >&2; die "$name failed (exit $rc): $*"
  fi
  if [ -n "$perf_pid" ]; then
    # perf writes its file on SIGTERM as on SIGINT (which background jobs ignore).
    kill -TERM "$perf_pid" 2>/dev/null || true; wait "$perf_pid" 2>/dev/null || true
    rm -f "$DIR/perf.pid"
  fi
  echo "$out"
}

lat_secs() { [ "$SMOKE" = 1 ] && echo 1 || echo "$SECS"; }

# A sockperf client now and then stalls at start ("No valid observations", or no figures):
# such a run is measured once more, said in the log with sockperf's own words; a second
# failure ends the run.
measure_latency() { # measure_latency PATH PLACEMENT RUN CPU HOST PORT
  local out= attempt
  local pct; pct() { awk -v q="$1" '$2 == "--->" && $3 == "percentile" && $4 == q {print $6}' <<< "$out"; }
  local p50= p99= tps=
  for attempt in 1 2; do
    if out=$(client sockperf "$4" sockperf ping-pong --tcp -i "$5" -p "$6" -m 64 -t "$(lat_secs)" --full-rtt); then
      p50=$(pct 50.000); p99=$(pct 99.000)
      tps=$(sed -n 's/.*\[Valid Duration\] RunTime=\([0-9.]*\) sec;.*ReceivedMessages=\([0-9]*\).*/\2 \1/p' <<< "$out" | awk '$2 > 0 {printf "%.1f", $1 / $2}')
      [ -n "$p50" ] && [ -n "$p99" ] && [ -n "$tps" ] && break
    fi
    log "sockperf through $1 gave no valid figures (attempt $attempt of 2): $({ echo "$out"; cat "$DIR/sockperf.err" 2> /dev/null; } | grep -m1 -i 'no valid\|error' || true)"
    p50=
  done
  [ -n "$p50" ] || { echo "$out" >&2; die "cannot read sockperf's output ($1) after 2 attempts"; }
  emit "$1" "$2" p50_us "$3" "$p50"; emit "$1" "$2" p99_us "$3" "$p99"; emit "$1" "$2" tps "$3" "$tps"
}

measure_bulk() { # measure_bulk PATH PLACEMENT RUN CPU HOST PORT
  local len=(-t "$SECS"); [ "$SMOKE" = 1 ] && len=(-n 64M)
  local out gbps
  out=$(client bulk "$4" iperf3 -c "$5" -p "$6" -P 1 "${len[@]}" -f m)
  gbps=$(awk '/receiver/ {for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") v = $i} END {if (v != "") printf "%.3f", v / 1000}' <<< "$out")
  [ -n "$gbps" ] || { echo "$out" >&2; die "cannot read iperf3's output ($1)"; }
  emit "$1" "$2" bulk_gbps "$3" "$gbps"
}

measure_crr() { # measure_crr PATH PLACEMENT RUN CPU HOST PORT
  local secs=$SECS; [ "$SMOKE" = 1 ] && secs=0.5
  local out rate errors
  out=$(client crr "$4" "$BENCHTOOL" crr --to "$5:$6" --secs "$secs")
  rate=$(awk '{print $4}' <<< "$out"); errors=$(awk '{print $6}' <<< "$out")
  [ -n "$rate" ] || die "cannot read benchtool crr's output ($1): $out"
  [ "$errors" = 0 ] || die "connect-request-close through $1 had errors: $out"
  emit "$1" "$2" cps "$3" "$rate"
}

# HBONE streams the nodes' agents opened and accepted: proof that mesh-tunnel went through
# the tunnel (and direct did not).
hbone_streams() { # hbone_streams NODE DIRECTION
  admin_get "$1" /metrics | awk -v d="direction=\"$2\"" '/^mesh_hbone_streams_total/ && index($0, d) {s += $NF} END {print s + 0}'
}

PATHS=(direct mesh-tunnel envoy-hbone)
[ -n "$AGENT_B" ] && PATHS+=(mesh-tunnel-b)
[ -n "${CLUSTER_PATHS:-}" ] && read -r -a PATHS <<< "$CLUSTER_PATHS"

placement_cpus() { # placement_cpus PLACEMENT -> "client server node0 node1"
  case $1 in
    1cpu) echo "0 0 0 0" ;;
    # Each node (its agent, its Envoy, its pod) on a vCPU of its own, as two machines.
    2cpu) echo "0 1 0 1" ;;
    *) die "unknown placement $1" ;;
  esac
}

run_suite() {
  local placement run path cc sc c0 c1 ip ports
  for placement in $PLACEMENTS; do
    read -r cc sc c0 c1 <<< "$(placement_cpus "$placement")"
    # Runs outermost: a burst of load on the machine spreads over all paths.
    for run in $(seq "$RUNS"); do
      for path in "${PATHS[@]}"; do
        log "$placement run $run/$RUNS: $path"
        CUR=$placement-$run-$path
        start_servers "$sc"
        ip=$SRV_IP; ports=("${SRV_PORTS[@]}")
        case $path in
          direct) config 0; start_agents "$c0" "$c1" 0 ;;
          mesh-tunnel) config 1; start_agents "$c0" "$c1" 1 ;;
          mesh-tunnel-b) [ -n "$AGENT_B" ] || die "mesh-tunnel-b needs MESH_AGENT_BIN_B"
            config 1; start_agents "$c0" "$c1" 1 "$AGENT_B" ;;
          envoy-hbone) config 0; start_agents "$c0" "$c1" 0
            start_envoy_server "$c1"; start_envoy_client "$c0"
            ip=${POD_NET[0]}.1; ports=("${ENVOY_CLI_PORTS[@]}") ;;
        esac
        measure_latency "$path" "$placement" "$run" "$cc" "$ip" "${ports[0]}"
        measure_bulk "$path" "$placement" "$run" "$cc" "$ip" "${ports[1]}"
        measure_crr "$path" "$placement" "$run" "$cc" "$ip" "${ports[2]}"
        local out_s in_s
        out_s=$(hbone_streams n0 out); in_s=$(hbone_streams n1 in)
        case $path in
          mesh-tunnel*) [ "$out_s" -gt 0 ] && [ "$in_s" -gt 0 ] \
            || die "$path: no HBONE stream counted (node 0 outbound $out_s, node 1 inbound $in_s)" ;;
          *) [ "$out_s" = 0 ] || die "$path: node 0's agent tunnelled $out_s streams (the namespaces are not enrolled)" ;;
        esac
        emit "$path" "$placement" hbone_streams "$run" "$out_s"
        stop envoy-client envoy-server agent-n0 agent-n1 sockperf iperf3 reply
      done
    done
  done
}

main() {
  case ${1:-} in
    check) check ;;
    clean) clean ;;
    run)
      [ -n "$AGENT" ] && [ -n "$BENCHTOOL" ] && [ -n "$ENVOY" ] || die "run it with cargo xtask bench cluster"
      local t; for t in sockperf iperf3 openssl nsenter curl taskset "$ENVOY"; do
        command -v "$t" > /dev/null || die "$t is missing (cargo xtask setup installs it)"
      done
      check
      trap 'trap "" INT TERM; exec 2>/dev/null; clean' EXIT
      trap 'exit 130' INT TERM
      cluster_up
      run_suite
      ;;
    *) die "usage: bench-cluster.sh check|clean|run" ;;
  esac
}
main "$@"
