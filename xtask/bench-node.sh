# shellcheck shell=bash
# The simulated node shared by the bench suites (sourced by bench.sh and bench-l7.sh):
# leftover checks, clean-up, the bridge and its pods, running pinned in a cgroup.
# The sourcing script sets: TAG (log prefix), NSP (netns and veth prefix), PODS
# ("name:host ..."), BR, NODE_IP (the bridge's address, pods get .host), CG, PIN, DIR,
# NODE_PORTS, and defines pod_up NAME (extra per-pod set-up). CHECK_SCRATCH=1 also
# counts a left scratch directory as a leftover.

log() { echo "$TAG: $*" >&2; }
die() { echo "$TAG: error: $*" >&2; exit 1; }

# --- leftovers -------------------------------------------------------------------------

leftovers() {
  local l=()
  ip netns list 2>/dev/null | grep -qE "^$NSP-" && l+=("network namespaces: $(ip netns list | grep -E "^$NSP-" | awk '{print $1}' | paste -sd' ')")
  ip link show "$BR" > /dev/null 2>&1 && l+=("bridge $BR")
  [ -d "$CG" ] && l+=("cgroup $CG (processes: $(cat "$CG"/cgroup.procs "$CG"/*/cgroup.procs 2>/dev/null | paste -sd' '))")
  [ -e "$PIN" ] && l+=("bpffs pins $PIN")
  [ "${CHECK_SCRATCH:-0}" = 1 ] && [ -d "$DIR" ] && l+=("scratch directory $DIR")
  local p; p=$(pgrep -f -- "--pin-path $PIN" | paste -sd' ' || true)
  [ -n "$p" ] && l+=("a mesh-agent on $PIN (pid $p)")
  # A listener on one of the ports counts only where it would collide: on the node's
  # bridge address, loopback or a wildcard (the tests' agents listen on 10.201.x.1:15001).
  local port held
  for port in "${NODE_PORTS[@]}"; do
    held=$(ss -Hltnp "sport = :$port" | awk -v a="$NODE_IP" '{n = split($4, p, ":"); ip = substr($4, 1, length($4) - length(p[n]) - 1)} ip == a || ip == "127.0.0.1" || ip == "0.0.0.0" || ip == "*" || ip == "[::]" {print $4, $NF; exit}')
    [ -n "$held" ] && l+=("a listener on TCP port $port: $held")
  done
  printf '%s\n' "${l[@]+"${l[@]}"}"
}

check() {
  local l; l=$(leftovers)
  if [ -n "$l" ]; then
    echo "$TAG: refusing to start: an earlier run (or something else) holds what this one needs:" >&2
    sed 's/^/  - /' <<< "$l" >&2
    echo "$TAG: they would bias or break the measurements; remove them with \`cargo xtask bench --clean\` (ports held by other programs: stop those yourself)" >&2
    exit 1
  fi
}

# Kills only what this script started: processes in its cgroups and the pids it wrote down.
clean() {
  local d f
  for f in "$DIR"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  for d in "$CG"/*/ "$CG/"; do [ -f "$d/cgroup.procs" ] && xargs -r kill 2>/dev/null < "$d/cgroup.procs" || true; done
  for _ in $(seq 50); do
    [ -z "$(cat "$CG"/cgroup.procs "$CG"/*/cgroup.procs 2>/dev/null)" ] && break; sleep 0.1
  done
  for d in "$CG"/*/ "$CG/"; do [ -f "$d/cgroup.procs" ] && xargs -r kill -9 2>/dev/null < "$d/cgroup.procs" || true; done
  sleep 0.2
  local p; for p in $PODS; do ip netns del "$NSP-${p%%:*}" 2>/dev/null || true; done
  ip link del "$BR" 2>/dev/null || true
  for d in "$CG"/*/; do [ -d "$d" ] && rmdir "$d" 2>/dev/null || true; done
  [ -d "$CG" ] && rmdir "$CG" 2>/dev/null || true
  # The agent removes its pins on stop; a killed one leaves them.
  [ -e "$PIN" ] && rm -rf "$PIN" 2>/dev/null || true
  rm -rf "$DIR"
}

# --- the simulated node ----------------------------------------------------------------

node_up() {
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
  mkdir -p "$DIR" "$CG" "$CG/ref"
  ip link add "$BR" type bridge; ip addr add "$NODE_IP/24" dev "$BR"; ip link set "$BR" up
  local p n h
  for p in $PODS; do
    n=${p%%:*}; h=${p##*:}
    ip netns add "$NSP-$n"; ip link add "$NSP$h" type veth peer name eth0 netns "$NSP-$n"
    ip link set "$NSP$h" master "$BR" up; ip -n "$NSP-$n" addr add "${NODE_IP%.*}.$h/24" dev eth0
    ip -n "$NSP-$n" link set eth0 up; ip -n "$NSP-$n" link set lo up; mkdir -p "$CG/$n"
    pod_up "$n"
  done
}

# in_cg CGROUP CPUS CMD...: run CMD in the cgroup, pinned; pod cgroups also enter the pod
# netns. It execs, so call it in a subshell (`&` or `$(...)`): then the pid is CMD's own.
in_cg() {
  local cg=$1 cpus=$2; shift 2
  local ns=()
  [ -d "$CG/$cg" ] && [ -e "/run/netns/$NSP-$cg" ] && ns=(ip netns exec "$NSP-$cg")
  local path=$CG/$cg; [ "$cg" = node ] && path=$CG
  exec sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$path" "${ns[@]+"${ns[@]}"}" taskset -c "$cpus" "$@"
}

# bg NAME CGROUP CPUS CMD...: start in the background, pid in $DIR/NAME.pid, output in $DIR/NAME.log.
bg() {
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

wait_port() { # wait_port NETNS|node IP PORT: until something listens there
  local cmd=(); [ "$1" != node ] && cmd=(ip netns exec "$1")
  for _ in $(seq 100); do
    "${cmd[@]+"${cmd[@]}"}" ss -Hltn "sport = :$3" | grep -q "$2:$3\|\*:$3\|0.0.0.0:$3" && return 0
    sleep 0.05
  done
  tail -n 5 "$DIR"/*.log >&2
  die "nothing listens on $2:$3 ($1)"
}

# How many vCPUs a CPU list ("0", "0,1", "0-1") names: every proxy gets that many workers,
# the reference proxies by their flag and the node proxy by following its affinity
# (`--proxy-workers 0`), so the comparisons are at equal workers (issue 13, item 4).
cpu_count() { # cpu_count LIST -> N
  local n=0 part
  for part in ${1//,/ }; do
    if [[ $part == *-* ]]; then n=$((n + ${part#*-} - ${part%-*} + 1)); else n=$((n + 1)); fi
  done
  echo "$n"
}

placement_cpus() { # placement_cpus PLACEMENT -> "client server node"
  case $1 in
    1cpu) echo "0 0 0" ;;
    # Client and server on different vCPUs; the node side (agent, proxies) is left to
    # the scheduler.
    2cpu) echo "0 1 0,1" ;;
    *) die "unknown placement $1" ;;
  esac
}
