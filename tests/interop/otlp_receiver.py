"""Test helpers for tests/tests/traces.rs, on the OpenTelemetry Python protobufs and grpcio.

receiver --out FILE
    A real OTLP/gRPC trace receiver (opentelemetry.proto.collector.trace.v1.TraceService)
    on 127.0.0.1, port chosen by the kernel. Prints `listening PORT` once serving, then
    appends one JSON line per received span to FILE: ids in hex, kind, name, attributes,
    status, and the resource's attributes. Runs until killed.

upstream --listen ADDR [--fail-first N]
    An HTTP/1.1 server that answers every request with a JSON body of the request's
    headers (lower-case names). With --fail-first N it closes the connection without an
    answer on the first N requests whose `x-fail-key` header it has not seen N times
    yet, so a retrying proxy's second try succeeds. Prints `listening` once serving.

get --to ADDR --path PATH [--header 'k: v']...
    One GET; prints a JSON line with the status and the parsed body.
"""

import argparse
import http.client
import http.server
import json
import socketserver
import sys
import threading
from concurrent import futures


def _value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def _attrs(kvs):
    return {kv.key: _value(kv.value) for kv in kvs}


def receiver(args):
    import grpc
    from opentelemetry.proto.collector.trace.v1 import (
        trace_service_pb2,
        trace_service_pb2_grpc,
    )

    lock = threading.Lock()
    out = open(args.out, "a", encoding="utf-8")

    class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            lines = []
            for rs in request.resource_spans:
                resource = _attrs(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        lines.append(
                            json.dumps(
                                {
                                    "trace_id": s.trace_id.hex(),
                                    "span_id": s.span_id.hex(),
                                    "parent_span_id": s.parent_span_id.hex(),
                                    "name": s.name,
                                    "kind": s.kind,
                                    "start_ns": s.start_time_unix_nano,
                                    "end_ns": s.end_time_unix_nano,
                                    "attributes": _attrs(s.attributes),
                                    "status_code": s.status.code,
                                    "status_message": s.status.message,
                                    "flags": s.flags,
                                    "scope": ss.scope.name,
                                    "resource": resource,
                                }
                            )
                        )
            with lock:
                for line in lines:
                    out.write(line + "\n")
                out.flush()
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening {port}", flush=True)
    server.wait_for_termination()


def upstream(args):
    seen = {}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            key = self.headers.get("x-fail-key")
            if key is not None:
                with lock:
                    n = seen.get(key, 0)
                    seen[key] = n + 1
                if n < args.fail_first:
                    # No answer: the proxy sees the connection closed before a response.
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
            body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    host, port = args.listen.rsplit(":", 1)
    srv = Server((host, int(port)), Handler)
    print("listening", flush=True)
    srv.serve_forever()


def get(args):
    host, port = args.to.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {}
    for h in args.header:
        k, v = h.split(":", 1)
        headers[k.strip()] = v.strip()
    c.request("GET", args.path, headers=headers)
    r = c.getresponse()
    body = r.read().decode("utf-8", "replace")
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = body
    print(json.dumps({"status": r.status, "body": parsed}), flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("receiver")
    r.add_argument("--out", required=True)
    u = sub.add_parser("upstream")
    u.add_argument("--listen", required=True)
    u.add_argument("--fail-first", type=int, default=0)
    g = sub.add_parser("get")
    g.add_argument("--to", required=True)
    g.add_argument("--path", default="/")
    g.add_argument("--header", action="append", default=[])
    args = p.parse_args()
    {"receiver": receiver, "upstream": upstream, "get": get}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
