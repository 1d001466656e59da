#!/usr/bin/env python3
"""The xDS suite of `cargo xtask bench` (issue 5, item 4): the embedded control plane
(`mesh-agent control-plane`) serving N services with 10 endpoints each, to one client at a
time: our proxy's xDS client (`mesh-agent xds-watch`, delta and SotW) and Envoy (delta and
SotW) as the reference, in the same run from the same server. Appends raw lines to $RAW:
    xds CLIENT SCALE METRIC RUN VALUE
and xtask turns them into JSON, Markdown and an SVG plot. Run it through
`cargo xtask bench xds` (which builds the binaries and sets the variables below).

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

Why Python and not bash like bench.sh: a millisecond poll of the admin endpoint and the
byte counters must not pay a fork per sample. Names (distinct from the other suites):
scratch /tmp/mesh-bench-xds, ports 127.0.0.1:15810-15812, services' vips in 127.96.0.0/16
(Envoy binds each listener: loopback addresses always bind), node ids bench-*.
"""

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
RUNS = int(os.environ.get("RUNS", "5"))
SMOKE = os.environ.get("SMOKE", "0") == "1"
RAW = os.environ.get("RAW", "/dev/stdout")
SCALES = [20] if SMOKE else [int(s) for s in os.environ.get("XDS_SCALES", "1000 10000").split()]
ENDPOINTS = 10  # per service
DIR = "/tmp/mesh-bench-xds"
XDS_PORT, CP_ADMIN_PORT, ENVOY_ADMIN_PORT = 15810, 15811, 15812
PORTS = [XDS_PORT, CP_ADMIN_PORT, ENVOY_ADMIN_PORT]
CLIENTS = ["mesh-delta", "mesh-sotw", "envoy-delta", "envoy-sotw"]
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


# --- measurements ----------------------------------------------------------------------------


def emit(client, scale, metric, run, value):
    with open(RAW, "a") as f:
        f.write(f"xds {client} {scale_name(scale)} {metric} {run} {value}\n")


def scale_name(n):
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def stream_of(node):
    """The open stream of NODE in /xds_clients, or None."""
    clients = json.loads(get(f"http://127.0.0.1:{CP_ADMIN_PORT}/xds_clients"))
    for s in clients.values():
        if s.get("node") == node and s.get("open"):
            return s
    return None


def server_version():
    return get(f"http://127.0.0.1:{CP_ADMIN_PORT}/version").strip()


def wait_acked(node, cond, proc, name, t0, published=None):
    """Polls /xds_clients (~1 ms) until cond(stream) holds; returns seconds since t0.
    With `published` (a list): also polls /version and appends when it first changes."""
    v0 = server_version() if published is not None else None
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


def measure(client, n, run, cfg, port0):
    kind, mode = client.split("-")
    node = f"bench-{client}-{run}"
    name = f"client-{client}"
    if kind == "mesh":
        cmd = [AGENT, "--log", "warn", "xds-watch", "--xds-address", f"http://127.0.0.1:{XDS_PORT}",
               "--mode", mode, "--node-id", node]
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
    emit(client, n, "ack_ms", run, f"{ack * 1000:.2f}")
    emit(client, n, "start_ack_ms", run, f"{started * 1000:.2f}")
    emit(client, n, "rss_kb", run, rss_kb(proc.pid))
    b1 = bytes_sent()
    emit(client, n, "load_bytes", run, b1 - b0)

    before = stream_of(node)["acked"][EDS]
    port0 += 1
    tmp = write_config(cfg, n, port0)
    t0 = time.monotonic()
    os.rename(tmp, cfg)
    published = []
    change = wait_acked(node, lambda s: s["acked"].get(EDS) != before, proc, name, t0, published)
    time.sleep(0.2 if SMOKE else 0.5)
    emit(client, n, "change_ms", run, f"{change * 1000:.2f}")
    # Where the change's time goes: the server (file poll, parse, translate, publish) and
    # then the push, the client's decode and apply, its ACK.
    pub = published[0] if published else change
    emit(client, n, "change_server_ms", run, f"{pub * 1000:.2f}")
    emit(client, n, "change_client_ms", run, f"{(change - pub) * 1000:.2f}")
    emit(client, n, "change_bytes", run, bytes_sent() - b1)
    stop(name)
    return port0


def run():
    if not AGENT or not ENVOY:
        die("run it with cargo xtask bench xds")
    check()
    os.makedirs(DIR)
    port0 = 8080
    for n in SCALES:
        cfg = os.path.join(DIR, f"mesh-{n}.yaml")
        os.rename(write_config(cfg, n, port0), cfg)
        for r in range(1, RUNS + 1):
            # A fresh server per run: every client of the run meets the same server state.
            start("control-plane", SERVER_CPU, [AGENT, "--log", "warn", "control-plane", "--config", cfg,
                                                "--listen", f"127.0.0.1:{XDS_PORT}",
                                                "--admin-address", f"127.0.0.1:{CP_ADMIN_PORT}",
                                                "--reload-interval-ms", "5"])
            wait_http(f"http://127.0.0.1:{CP_ADMIN_PORT}/ready", "the control plane")
            for client in CLIENTS:
                log(f"{scale_name(n)} services run {r}/{RUNS}: {client}")
                port0 = measure(client, n, r, cfg, port0)
            stop("control-plane")


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
