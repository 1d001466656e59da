#!/usr/bin/env python3
"""The xDS suite of `cargo xtask bench` (issue 5, item 4): the embedded control plane
(`mesh-agent control-plane`) serving N services with 10 endpoints each, to one client at a
time: our proxy's xDS client (`mesh-agent xds-watch`, delta and SotW), the whole agent
(`mesh-agent run`: datapath attached, node proxy subscribed wildcard, delta: client
`agent-delta`, file source only) and Envoy (delta and SotW) as the reference, in the same
run from the same server. Two sources of the same
services:
  file  a generated standalone file (`--config`), polled every 5 ms
  k8s   the Kubernetes API server test double (`kube-double`, `--source kubernetes`):
        one Namespace, N Services, N EndpointSlices, created through its HTTP API before
        the control plane starts (the time it takes is printed, not measured as a figure).
        Our clients only by default: Envoy receives the same resources from either source
        (same bytes), so its side would be measured twice for ~20 s per 10k run.
Appends raw lines to $RAW:
    xds CLIENT SCALE METRIC RUN VALUE
where SCALE is `20`, `1k`, `10k` for the file and `20-k8s`, `1k-k8s`, `10k-k8s` for
Kubernetes, and the client `control-plane` carries the server's own figures. xtask turns
them into JSON, Markdown and an SVG plot. Run it through `cargo xtask bench xds` (which
builds the binaries and sets the variables below).

By hand, fewer clients, sources or scales (space or comma separated; call the script
directly, with MESH_AGENT_BIN, KUBE_DOUBLE_BIN, ENVOY_BIN and RAW set, as `cargo xtask
bench` would publish the partial tables to docs/bench/):
    XDS_CLIENTS=mesh-delta,mesh-sotw XDS_SOURCES=k8s XDS_SCALES=10000 RUNS=3

    bench-xds.py check    refuse (exit 1) if an earlier run left something behind
    bench-xds.py clean    remove what an earlier run left behind
    bench-xds.py run      measure

Per client and run:
  ack_ms        the client's stream is open -> the server has the client's ACK of all
                four types (listeners, routes, clusters, endpoints): /xds_clients polled
                every ~1 ms, so both ends are seen within about a millisecond
  start_ack_ms  the same from the client's process start (adds its start-up: Envoy's is
                ~0.1-0.2 s)
  rss_kb        the client's RSS once loaded (xds-watch holds the decoded and validated
                config like the proxy; Envoy's includes its ~20 MB baseline)
  load_bytes    bytes the server wrote to the client's socket for that (TCP payload: gRPC
                + HTTP/2 framing; `ss -ti` bytes_sent)
  change_ms     one endpoint's port changed in the file (atomic rename) -> the server has
                the client's ACK of the new endpoints version (includes the file poll, at
                most --reload-interval-ms 5, re-parsing and re-translating the whole file)
  change_server_ms, change_client_ms: the same split where the server's /version
                changes (polled too): file poll + parse + translate + publish, then push +
                client decode and apply + ACK
  change_bytes  bytes the server wrote to the client for that change
  server_rss_kb the control plane's RSS once the client is loaded (a fresh server per run,
                so the first client's row is the server with one stream)
For the k8s source the change is one EndpointSlice patched (JSON patch: its first
endpoint's address), and change_server_ms includes the watch event and the source's 20 ms
debounce. Per run, client `control-plane`:
  ready_ms      the control plane's process start -> /version shows the full config (file:
                parse and translate before serving; k8s: connect, list the five kinds,
                build, translate; mostly the double's paginated lists at 10k, which cost
                more than a real API server's)

Why Python and not bash like bench.sh: a millisecond poll of the admin endpoint and the
byte counters must not pay a fork per sample. Names (distinct from the other suites):
scratch /tmp/mesh-bench-xds, ports 127.0.0.1:15810-15813 (15813: kube-double), services'
vips in 127.96.0.0/16 (Envoy binds each listener: loopback addresses always bind; the
double does not check clusterIP ranges), node ids bench-*, Kubernetes namespace `b`.
"""

import concurrent.futures
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

AGENT = os.environ.get("MESH_AGENT_BIN", "")
ENVOY = os.environ.get("ENVOY_BIN", "")
KUBE_DOUBLE = os.environ.get("KUBE_DOUBLE_BIN", "")
RUNS = int(os.environ.get("RUNS", "5"))
SMOKE = os.environ.get("SMOKE", "0") == "1"
RAW = os.environ.get("RAW", "/dev/stdout")
ENDPOINTS = 10  # per service
DIR = "/tmp/mesh-bench-xds"
XDS_PORT, CP_ADMIN_PORT, ENVOY_ADMIN_PORT, KUBE_PORT = 15810, 15811, 15812, 15813
# The whole agent as a client (`agent-delta`): its admin endpoint and its proxy's listener.
AGENT_ADMIN_PORT, AGENT_PROXY_PORT = 15814, 15815
PORTS = [XDS_PORT, CP_ADMIN_PORT, ENVOY_ADMIN_PORT, KUBE_PORT, AGENT_ADMIN_PORT, AGENT_PROXY_PORT]
# The agent's own cgroup (it attaches there, so it captures nothing of the machine's) and
# pin folder.
CG = os.path.join(
    next((ln.split()[4] for ln in open("/proc/self/mountinfo") if ln.split()[8:9] == ["cgroup2"]),
         "/sys/fs/cgroup"),
    "mesh-bench-xds")
PIN = "/sys/fs/bpf/mesh-bench-xds"


def env_list(name, default):
    return os.environ.get(name, default).replace(",", " ").split()


ALL_CLIENTS = ["mesh-delta", "mesh-sotw", "agent-delta", "envoy-delta", "envoy-sotw"]
CLIENTS = env_list("XDS_CLIENTS", " ".join(ALL_CLIENTS))
SOURCES = env_list("XDS_SOURCES", "file k8s")
SCALES = [20] if SMOKE else [int(s) for s in env_list("XDS_SCALES", "1000 10000")]
# Per source, the clients measured (see the top: Envoy's side does not depend on it).
SOURCE_CLIENTS = {
    "file": [c for c in ALL_CLIENTS if c in CLIENTS],
    # The whole agent's xDS side is xds-watch's (same client, same build): from the file only.
    "k8s": [c for c in ["mesh-delta", "mesh-sotw"] if c in CLIENTS],
}
# Client and server on different vCPUs where there are two.
NCPU = os.cpu_count() or 1
SERVER_CPU, CLIENT_CPU = ("1", "0") if NCPU > 1 else ("0", "0")
TYPES = [
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
]
EDS = TYPES[3]
TIMEOUT_S = 120


def log(msg):
    print(f"bench-xds: {msg}", file=sys.stderr, flush=True)


def die(msg):
    print(f"bench-xds: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


# --- leftovers -------------------------------------------------------------------------


def listening(port):
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return out.strip()


def leftovers():
    found = []
    if os.path.isdir(DIR):
        found.append(f"scratch directory {DIR}")
    for path, what in [(PIN, "pin folder"), (CG, "cgroup")]:
        if os.path.exists(path):
            found.append(f"{what} {path}")
    for port in PORTS:
        who = listening(port)
        if who:
            found.append(f"a listener on TCP port {port}: {who.split()[-1]}")
    return found


def check():
    found = leftovers()
    if found:
        print("bench-xds: refusing to start: an earlier run (or something else) holds what this one needs:", file=sys.stderr)
        for f in found:
            print(f"  - {f}", file=sys.stderr)
        print("bench-xds: remove them with `cargo xtask bench --clean` (ports held by other programs: stop those yourself)", file=sys.stderr)
        sys.exit(1)


def clean():
    """Kills only the processes this suite wrote down in its scratch directory."""
    if os.path.isdir(DIR):
        for f in os.listdir(DIR):
            if f.endswith(".pid"):
                try:
                    pid = int(open(os.path.join(DIR, f)).read().strip())
                    os.kill(pid, signal.SIGKILL)
                except (ValueError, OSError):
                    pass
        time.sleep(0.2)
        subprocess.run(["rm", "-rf", DIR])
    # A killed agent leaves its pins (links and maps): removing them detaches its programs.
    subprocess.run(["rm", "-rf", PIN])
    if os.path.isdir(CG):
        try:
            os.rmdir(CG)
        except OSError as e:
            print(f"bench-xds: cannot remove {CG}: {e}", file=sys.stderr)


# --- processes ---------------------------------------------------------------------------

PROCS = {}


def start(name, cpus, cmd):
    """Pinned, output in DIR/NAME.log, pid in DIR/NAME.pid (for `clean` after a crash)."""
    logf = open(os.path.join(DIR, f"{name}.log"), "w")
    p = subprocess.Popen(["taskset", "-c", cpus] + cmd, stdout=logf, stderr=subprocess.STDOUT)
    with open(os.path.join(DIR, f"{name}.pid"), "w") as f:
        f.write(str(p.pid))
    PROCS[name] = p
    return p


def stop(name):
    p = PROCS.pop(name, None)
    if p is None:
        return
    p.terminate()
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    try:
        os.remove(os.path.join(DIR, f"{name}.pid"))
    except OSError:
        pass


def stop_all():
    for name in list(PROCS):
        stop(name)


def tail(name, n=15):
    try:
        return "".join(open(os.path.join(DIR, f"{name}.log")).readlines()[-n:])
    except OSError:
        return ""


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def wait_http(url, what):
    for _ in range(200):
        try:
            return get(url)
        except OSError:
            time.sleep(0.05)
    die(f"{what} did not answer at {url}")


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bytes_sent():
    """TCP payload the control plane has written to its clients (all its ADS sockets)."""
    out = subprocess.run(
        ["ss", "-Htin", "state", "established", f"( sport = :{XDS_PORT} )"],
        capture_output=True, text=True).stdout
    return sum(int(m) for m in re.findall(r"bytes_sent:(\d+)", out))


# --- the configuration ---------------------------------------------------------------------


def vip(i):
    return f"127.96.{i >> 8}.{i & 255}"


def write_config(path, n, port0):
    """N services, ENDPOINTS explicit endpoints each; service s0's first endpoint listens on
    port0 (the change flips it). Written beside and renamed: the server never reads half."""
    lines = ["namespaces:", "  - { name: b }", "services:"]
    for i in range(n):
        hi, lo = i >> 8, i & 255
        eps = ", ".join(
            f"{{ ip: 10.{100 + j}.{hi}.{lo}, port: {port0 if i == 0 and j == 0 else 8080} }}"
            for j in range(ENDPOINTS))
        lines.append(
            f"  - {{ name: s{i}, namespace: b, vip: {vip(i)}, ports: [ {{ port: 80, target_port: 8080, protocol: http }} ], endpoints: [ {eps} ] }}")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    return tmp


def envoy_bootstrap(path, node, mode):
    src = {"ads": {}, "resource_api_version": "V3"}
    boot = {
        "node": {"id": node, "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ENVOY_ADMIN_PORT}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if mode == "delta" else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
            },
            "lds_config": src,
            "cds_config": src,
        },
        "static_resources": {"clusters": [{
            "name": "xds",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                },
            },
            "load_assignment": {
                "cluster_name": "xds",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": XDS_PORT}}}}]}],
            },
        }]},
    }
    with open(path, "w") as f:
        json.dump(boot, f)


# --- the same services in Kubernetes ---------------------------------------------------------


class KubeApi:
    """One keep-alive HTTP/1.1 connection to kube-double, used as a real API server is."""

    def __init__(self):
        self.conn = http.client.HTTPConnection("127.0.0.1", KUBE_PORT, timeout=30)

    def call(self, method, path, body, content_type="application/json"):
        self.conn.request(method, path, body=json.dumps(body).encode(),
                          headers={"Content-Type": content_type})
        r = self.conn.getresponse()
        data = r.read()
        if r.status not in (200, 201):
            raise RuntimeError(f"kube-double: {method} {path}: HTTP {r.status}: {data[:500].decode(errors='replace')}")
        return data

    def close(self):
        self.conn.close()


def service(i):
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": f"s{i}", "namespace": "b"},
        "spec": {"clusterIP": vip(i), "ports": [{
            "name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "appProtocol": "http"}]},
    }


def endpoint_slice(i):
    """What the file declares for s{i}: ENDPOINTS ready endpoints on port 8080."""
    hi, lo = i >> 8, i & 255
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"s{i}-bench", "namespace": "b",
                     "labels": {"kubernetes.io/service-name": f"s{i}"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
        "endpoints": [{"addresses": [f"10.{100 + j}.{hi}.{lo}"], "conditions": {"ready": True}}
                      for j in range(ENDPOINTS)],
    }


SLICES = "/apis/discovery.k8s.io/v1/namespaces/b/endpointslices"
LOADERS = 3  # concurrent connections creating the objects


def start_kube(n):
    """A fresh kube-double holding the N services; returns (its kubeconfig, a connection)."""
    kc = os.path.join(DIR, "kubeconfig")
    # The API server is another machine in a cluster; here it shares the client's vCPU,
    # and is idle while a client loads.
    start("kube-double", CLIENT_CPU, [KUBE_DOUBLE, "--listen", f"127.0.0.1:{KUBE_PORT}",
                                      "--kubeconfig", kc])
    wait_http(f"http://127.0.0.1:{KUBE_PORT}/version", "kube-double")
    api = KubeApi()
    t0 = time.monotonic()

    def load(part):
        # One keep-alive connection per thread: the double (one thread) parses and stores
        # one request while this side encodes the next.
        conn = KubeApi()
        try:
            for i in range(part, n, LOADERS):
                conn.call("POST", "/api/v1/namespaces/b/services", service(i))
                conn.call("POST", SLICES, endpoint_slice(i))
        finally:
            conn.close()
    try:
        api.call("POST", "/api/v1/namespaces",
                 {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "b"}})
        with concurrent.futures.ThreadPoolExecutor(LOADERS) as pool:
            for f in [pool.submit(load, p) for p in range(LOADERS)]:
                f.result()
    except (RuntimeError, OSError) as e:
        die(f"loading kube-double: {e}\n{tail('kube-double')}")
    took = time.monotonic() - t0
    log(f"kube-double: {n} services and {n} endpoint slices created in {took:.1f} s "
        f"({2 * n / took:.0f} objects/s, {LOADERS} keep-alive connections)")
    return kc, api


def k8s_change(api, k):
    """Service s0's first endpoint moves to a new address (one endpoint, one
    ClusterLoadAssignment, as the file's port change)."""
    def change():
        t0 = time.monotonic()
        try:
            api.call("PATCH", f"{SLICES}/s0-bench",
                     [{"op": "replace", "path": "/endpoints/0/addresses/0",
                       "value": f"10.99.{(k >> 8) & 255}.{k & 255}"}],
                     "application/json-patch+json")
        except (RuntimeError, OSError) as e:
            die(f"patching the endpoint slice: {e}\n{tail('kube-double')}")
        return t0
    return change


def file_change(cfg, n, port0):
    """Service s0's first endpoint's port in the file, renamed into place."""
    def change():
        tmp = write_config(cfg, n, port0)
        t0 = time.monotonic()
        os.rename(tmp, cfg)
        return t0
    return change


# --- measurements ----------------------------------------------------------------------------


def emit(client, scale, metric, run, value):
    """SCALE: the scale's name (`scale_name`)."""
    with open(RAW, "a") as f:
        f.write(f"xds {client} {scale} {metric} {run} {value}\n")


def scale_name(n, source="file"):
    name = f"{n // 1000}k" if n % 1000 == 0 else str(n)
    return name if source == "file" else f"{name}-{source}"


def stream_of(node):
    """The open stream of NODE in /xds_clients, or None."""
    clients = json.loads(get(f"http://127.0.0.1:{CP_ADMIN_PORT}/xds_clients"))
    for s in clients.values():
        if s.get("node") == node and s.get("open"):
            return s
    return None


def server_version():
    return get(f"http://127.0.0.1:{CP_ADMIN_PORT}/version").strip()


def wait_acked(node, cond, proc, name, t0, published=None, v0=None):
    """Polls /xds_clients (~1 ms) until cond(stream) holds; returns seconds since t0.
    With `published` (a list): also polls /version and appends when it first differs from
    v0 (read before the change was made)."""
    while True:
        if published is not None and not published and server_version() != v0:
            published.append(time.monotonic() - t0)
        s = stream_of(node)
        if s is not None:
            if s.get("nacks"):
                die(f"{name} NACKed: {json.dumps(s.get('nack_log'))[:2000]}")
            if cond(s):
                return time.monotonic() - t0
        if proc.poll() is not None:
            die(f"{name} exited ({proc.returncode}):\n{tail(name)}")
        if time.monotonic() - t0 > TIMEOUT_S:
            die(f"{name}: no full ACK within {TIMEOUT_S} s; last state: {json.dumps(s)[:2000]}\n{tail(name)}")
        time.sleep(0.001)


def measure(client, scale, run, change):
    """One client against the running control plane; `change()` makes one endpoint change
    and returns the time it was made."""
    kind, mode = client.split("-")
    node = f"bench-{client}-{run}"
    name = f"client-{client}"
    if kind == "mesh":
        cmd = [AGENT, "--log", "warn", "xds-watch", "--xds-address", f"http://127.0.0.1:{XDS_PORT}",
               "--mode", mode, "--node-id", node]
    elif kind == "agent":
        # The proxy as it runs, wildcard instead of on demand (it subscribes to everything,
        # as Envoy does here), attached to a cgroup of its own (nothing to capture) with a
        # standalone file that only names the namespace (its workloads come from there).
        os.makedirs(CG, exist_ok=True)
        local = os.path.join(DIR, "agent.yaml")
        with open(local, "w") as f:
            f.write("namespaces:\n  - { name: b }\n")
        cmd = [AGENT, "--log", "warn", "run", "--config", local, "--pin-path", PIN, "--cgroup", CG,
               "--proxy-address", f"127.0.0.1:{AGENT_PROXY_PORT}",
               "--admin-address", f"127.0.0.1:{AGENT_ADMIN_PORT}",
               "--xds-address", f"http://127.0.0.1:{XDS_PORT}", "--xds-mode", mode,
               "--xds-on-demand", "false", "--node-name", node]
    else:
        boot = os.path.join(DIR, f"{node}.json")
        envoy_bootstrap(boot, node, mode)
        # One worker: Envoy binds one socket per worker and listener, and 10k listeners
        # times two workers would pass the fd limit a container cannot raise (20000 here).
        # One worker is less work for Envoy, never more.
        cmd = [ENVOY, "-c", boot, "--concurrency", "1", "--disable-hot-restart", "-l", "warning"]
    b0 = bytes_sent()
    t0 = time.monotonic()
    proc = start(name, CLIENT_CPU, cmd)
    opened = []

    def full(s):
        if not opened:
            opened.append(time.monotonic())
        return all(t in s.get("acked", {}) for t in TYPES)
    started = wait_acked(node, full, proc, name, t0)
    ack = t0 + started - opened[0]
    # Let the client settle (Envoy warms listeners after the ACK) before memory and bytes.
    time.sleep(0.3 if SMOKE else 1.0)
    emit(client, scale, "ack_ms", run, f"{ack * 1000:.2f}")
    emit(client, scale, "start_ack_ms", run, f"{started * 1000:.2f}")
    emit(client, scale, "rss_kb", run, rss_kb(proc.pid))
    emit(client, scale, "server_rss_kb", run, rss_kb(PROCS["control-plane"].pid))
    b1 = bytes_sent()
    emit(client, scale, "load_bytes", run, b1 - b0)

    before = stream_of(node)["acked"][EDS]
    published = []
    v0 = server_version()
    t0 = change()
    end = wait_acked(node, lambda s: s["acked"].get(EDS) != before, proc, name, t0, published, v0)
    time.sleep(0.2 if SMOKE else 0.5)
    emit(client, scale, "change_ms", run, f"{end * 1000:.2f}")
    # Where the change's time goes: the server (file poll, parse, translate, publish; or
    # watch event, debounce, build, translate, publish) and then the push, the client's
    # decode and apply, its ACK.
    pub = published[0] if published else end
    emit(client, scale, "change_server_ms", run, f"{pub * 1000:.2f}")
    emit(client, scale, "change_client_ms", run, f"{(end - pub) * 1000:.2f}")
    emit(client, scale, "change_bytes", run, bytes_sent() - b1)
    stop(name)


def start_control_plane(scale, run, source_args):
    """A fresh server per run (every client of the run meets the same server state), up
    once /version shows a config (the file's is loaded before serving; Kubernetes' first
    snapshot waits for every kind to be listed): `ready_ms` from its process start."""
    t0 = time.monotonic()
    proc = start("control-plane", SERVER_CPU,
                 [AGENT, "--log", "warn", "control-plane", *source_args,
                  "--listen", f"127.0.0.1:{XDS_PORT}",
                  "--admin-address", f"127.0.0.1:{CP_ADMIN_PORT}"])
    while True:
        try:
            if server_version() not in ("", "0"):
                break
        except OSError:
            pass
        if proc.poll() is not None:
            die(f"the control plane exited ({proc.returncode}):\n{tail('control-plane')}")
        if time.monotonic() - t0 > TIMEOUT_S:
            die(f"the control plane served no config within {TIMEOUT_S} s:\n{tail('control-plane')}")
        time.sleep(0.001)
    emit("control-plane", scale, "ready_ms", run, f"{(time.monotonic() - t0) * 1000:.2f}")


def run():
    if not AGENT or not ENVOY:
        die("run it with cargo xtask bench xds")
    bad = [c for c in CLIENTS if c not in ALL_CLIENTS] + [s for s in SOURCES if s not in SOURCE_CLIENTS]
    if bad:
        die(f"unknown client or source {bad} (clients {ALL_CLIENTS}, sources {list(SOURCE_CLIENTS)})")
    if "k8s" in SOURCES and not os.access(KUBE_DOUBLE, os.X_OK):
        die(f"no kube-double at KUBE_DOUBLE_BIN={KUBE_DOUBLE!r} (cargo xtask bench builds it and sets it)")
    check()
    os.makedirs(DIR)
    port0 = 8080
    changes = 0
    for n in SCALES:
        for source in SOURCES:
            clients = SOURCE_CLIENTS[source]
            if not clients:
                continue
            scale = scale_name(n, source)
            api = None
            if source == "file":
                cfg = os.path.join(DIR, f"mesh-{n}.yaml")
                os.rename(write_config(cfg, n, port0), cfg)
                args = ["--config", cfg, "--reload-interval-ms", "5"]
            else:
                kc, api = start_kube(n)
                args = ["--source", "kubernetes", "--kubeconfig", kc]
            for r in range(1, RUNS + 1):
                start_control_plane(scale, r, args)
                for client in clients:
                    log(f"{scale} services run {r}/{RUNS}: {client}")
                    if source == "file":
                        port0 += 1
                        change = file_change(cfg, n, port0)
                    else:
                        changes += 1
                        change = k8s_change(api, changes)
                    measure(client, scale, r, change)
                stop("control-plane")
            if api is not None:
                api.close()
                stop("kube-double")


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "check":
        check()
    elif cmd == "clean":
        clean()
    elif cmd == "run":
        def on_signal(sig, _frame):
            sys.exit(128 + sig)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            run()
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            stop_all()
            clean()
    else:
        die("usage: bench-xds.py check|clean|run")


if __name__ == "__main__":
    main()
