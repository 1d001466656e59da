#!/usr/bin/env bash
# The mesh-agent Kubernetes demo on a simulated node (`cargo xtask demo --kubernetes`, as root).
#
# No cluster here: the API server is the project's test double (kube-double, in memory,
# plain HTTP on loopback), driven with the real kubectl. The node does what a kubelet and
# a container runtime would: for each pod created in the API it makes a cgroup folder
# named after the pod's UID (the systemd driver's layout under kubepods.slice), a network
# namespace on the bridge mkdemobr (10.203.0.0/24), starts the pod's process in both and
# writes the pod IP into the pod's status. The agent runs with --source kubernetes.
# Everything is removed on exit, also on Ctrl-C.
set -euo pipefail

AGENT=${MESH_AGENT_BIN:?}
PODTOOL=${PODTOOL:?}
DOUBLE=${KUBE_DOUBLE:?}
KUBECTL_BIN=${MESH_KUBECTL:-kubectl}
CG_ROOT=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
CG=$CG_ROOT/mesh-kdemo
KUBEPODS=$CG/kubepods.slice/kubepods-besteffort.slice
PIN=/sys/fs/bpf/mesh-kdemo
DIR=/tmp/mesh-kdemo
BR=mkdemobr
ADMIN=127.0.0.1:15095
NODE=demo-node
AGENT_PID=
DOUBLE_PID=
NETNS=()

cleanup() {
  trap "" INT TERM
  exec 2>/dev/null
  trap - EXIT
  for f in $(find "$KUBEPODS" -name cgroup.procs 2>/dev/null); do xargs -r kill -9 < "$f" || true; done
  [ -n "$AGENT_PID" ] && kill -TERM "$AGENT_PID" && wait "$AGENT_PID" || true
  [ -n "$DOUBLE_PID" ] && kill -TERM "$DOUBLE_PID" && wait "$DOUBLE_PID" || true
  [ -f "$CG/cgroup.procs" ] && xargs -r kill -9 < "$CG/cgroup.procs" || true
  sleep 0.2
  for ns in "${NETNS[@]}"; do ip netns del "$ns" || true; done
  find "$CG" -depth -mindepth 1 -type d -exec rmdir {} \; || true
  rmdir "$CG" || true
  ip link del "$BR" || true
  rm -rf "$DIR"
  echo "demo: cleaned up (API server double, namespaces, bridge, cgroups, pins)"
}
trap cleanup EXIT INT TERM

k() { "$KUBECTL_BIN" --kubeconfig "$DIR/kubeconfig" --cache-dir "$DIR/kube-cache" "$@"; }
in_pod() { # in_pod NAME CMD... : run CMD inside the pod's cgroup and network namespace
  local pod=$1; shift
  sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$(cat "$DIR/$pod.cgroup")" ip netns exec "mkdemo-$pod" "$@"
}

# run_pod NS NAME HOST LABELS CMD... : the API object, then the node side, then the status.
run_pod() {
  local ns=$1 name=$2 host=$3 labels=$4; shift 4
  k apply -f - > /dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: { name: $name, namespace: $ns, labels: { $labels } }
spec: { nodeName: $NODE, containers: [ { name: main, image: podtool } ] }
EOF
  local uid; uid=$(k get pod "$name" -n "$ns" -o jsonpath='{.metadata.uid}')
  local cg="$KUBEPODS/kubepods-besteffort-pod${uid//-/_}.slice/cri-containerd-$name.scope"
  mkdir -p "$cg"; echo "$cg" > "$DIR/$name.cgroup"
  ip netns add "mkdemo-$name"; NETNS+=("mkdemo-$name")
  ip link add "mkdemo$host" type veth peer name eth0 netns "mkdemo-$name"
  ip link set "mkdemo$host" master "$BR" up
  ip -n "mkdemo-$name" addr add "10.203.0.$host/24" dev eth0
  ip -n "mkdemo-$name" link set eth0 up
  ip -n "mkdemo-$name" link set lo up
  ip -n "mkdemo-$name" route add default via 10.203.0.1
  ( in_pod "$name" "$@" > /dev/null 2>&1 & )
  k patch pod "$name" -n "$ns" --subresource=status --type=merge \
    -p "{\"status\":{\"phase\":\"Running\",\"podIP\":\"10.203.0.$host\"}}" > /dev/null
  printf '  %-22s uid %s  ip 10.203.0.%s  cgroup ...%s\n' "$ns/$name" "$uid" "$host" "${cg#"$CG"}"
}

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mkdir -p "$DIR" "$KUBEPODS"
ip link add "$BR" type bridge
ip addr add 10.203.0.1/24 dev "$BR"
ip link set "$BR" up

"$DOUBLE" --kubeconfig "$DIR/kubeconfig" > "$DIR/double.addr" 2> "$DIR/double.log" &
DOUBLE_PID=$!
for _ in $(seq 50); do [ -s "$DIR/kubeconfig" ] && break; sleep 0.1; done
echo "== API server test double at $(head -1 "$DIR/double.addr"); kubectl $("$KUBECTL_BIN" version --client -o json | sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p' | head -1)"

echo "== kubectl: namespaces, pods on $NODE (the node makes their cgroups and netns), services"
k create namespace shop > /dev/null
k create namespace backend > /dev/null
run_pod shop web 2 "app: web" sleep infinity
run_pod backend reviews-v1 3 "app: reviews, version: v1" "$PODTOOL" http --listen 0.0.0.0:8080 --name v1
run_pod backend reviews-v2 4 "app: reviews, version: v2" "$PODTOOL" http --listen 0.0.0.0:8080 --name v2
k apply -f - > /dev/null <<EOF
apiVersion: v1
kind: Service
metadata: { name: reviews, namespace: backend }
spec: { clusterIP: 10.96.0.10, selector: { app: reviews }, ports: [ { name: http, port: 80, targetPort: 8080 } ] }
---
apiVersion: v1
kind: Service
metadata: { name: reviews-v2, namespace: backend }
spec: { clusterIP: 10.96.0.11, selector: { version: v2 }, ports: [ { name: http, port: 80, targetPort: 8080 } ] }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: reviews-x1, namespace: backend, labels: { kubernetes.io/service-name: reviews } }
addressType: IPv4
ports: [ { name: http, port: 8080, protocol: TCP } ]
endpoints: [ { addresses: [ 10.203.0.3 ], conditions: { ready: true } } ]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: reviews-v2-x2, namespace: backend, labels: { kubernetes.io/service-name: reviews-v2 } }
addressType: IPv4
ports: [ { name: http, port: 8080, protocol: TCP } ]
endpoints: [ { addresses: [ 10.203.0.4 ], conditions: { ready: true } } ]
EOF
echo "  services backend/reviews 10.96.0.10:80 -> reviews-v1, backend/reviews-v2 10.96.0.11:80 -> reviews-v2"

echo "== starting mesh-agent --source kubernetes (log: $DIR/agent.log)"
echo "exclude: []" > "$DIR/settings.yaml"
sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$CG" \
  "$AGENT" run --source kubernetes --node-name "$NODE" --kubeconfig "$DIR/kubeconfig" \
  --kubepods-cgroup "$CG/kubepods.slice" --config "$DIR/settings.yaml" --pin-path "$PIN" --cgroup "$CG" \
  --proxy-address 10.203.0.1:15001 --admin-address "$ADMIN" --xds-listen 127.0.0.1:15094 2> "$DIR/agent.log" &
AGENT_PID=$!
for _ in $(seq 100); do
  curl -sf "http://$ADMIN/ready" > /dev/null 2>&1 && break
  kill -0 "$AGENT_PID" 2>/dev/null || { cat "$DIR/agent.log"; exit 1; }
  sleep 0.1
done
curl -sf "http://$ADMIN/ready"

workloads() {
  curl -s "http://$ADMIN/workloads" | python3 -c '
import json, sys
for w in json.load(sys.stdin)["workloads"]:
    print("  %-22s %-12s enrolled=%-5s %s" % (w["namespace"] + "/" + w["name"], w["ip"], str(w["enrolled"]).lower(), w.get("netns", "")))'
}
requests() { # requests LABEL ARGS...
  local label=$1; shift
  local r; r=$(in_pod web "$PODTOOL" http-client --to 10.96.0.10:80 "$@")
  printf '  %-40s %s\n' "$label" "$(echo "$r" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("answered by", r["bodies"], "errors", r["errors"] or "none")')"
}

echo
echo "== local workloads (GET /workloads): shop is not enrolled yet"
workloads
echo
echo "== kubectl label namespace shop mesh-agent.io/dataplane-mode=ambient"
k label namespace shop mesh-agent.io/dataplane-mode=ambient > /dev/null
for _ in $(seq 50); do
  [ "$("$AGENT" dump WORKLOADS --pin-path "$PIN" -o json)" != "[]" ] && break; sleep 0.1
done
workloads
echo "  WORKLOADS map (netns cookie -> workload), the running pod was not restarted:"
"$AGENT" dump WORKLOADS --pin-path "$PIN" | sed 's/^/    /'

echo
echo "== HTTP from shop/web to the Service address, captured by eBPF into the node proxy (L7)"
requests "no route:" --requests 20
echo
echo "== kubectl apply an HTTPRoute (GAMMA: parentRef is the Service): canary header -> v2, else 80/20"
k apply -f - > /dev/null <<EOF
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: reviews, namespace: backend }
spec:
  parentRefs: [ { group: "", kind: Service, name: reviews, port: 80 } ]
  rules:
  - matches: [ { headers: [ { name: x-canary, value: "yes" } ] } ]
    backendRefs: [ { name: reviews-v2, port: 80 } ]
  - backendRefs: [ { name: reviews, port: 80, weight: 80 }, { name: reviews-v2, port: 80, weight: 20 } ]
EOF
sleep 0.5
requests "x-canary: yes" --requests 20 --header "x-canary: yes"
requests "no header (80/20 split):" --requests 200
echo
echo "== kubectl delete httproute reviews"
k delete httproute reviews -n backend > /dev/null
sleep 0.5
requests "no route again:" --requests 20

echo
echo "== what the agent saw from the API server (GET /k8s)"
curl -s "http://$ADMIN/k8s" | python3 -c '
import json, sys
k = json.load(sys.stdin)
for kind, n in k["watch_events"].items():
    print("  %-16s events %-4d relists %-3d errors %d" % (kind, n, k["relists"][kind], k["watch_errors"][kind]))'
echo
echo "== requests per route (GET /metrics, mesh_requests_total)"
curl -s "http://$ADMIN/metrics" | grep '^mesh_requests_total' | sed 's/^/  /'
