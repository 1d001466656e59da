"""gRPC's own xDS client against mesh-agent's control plane (tests/tests/interop.rs).

    grpc_xds.py serve NAME     a gRPC server on 127.0.0.1 (port printed on stdout) whose
                               one unary method answers b"NAME:" + the request
    grpc_xds.py call TARGET    one unary call to TARGET (e.g. xds:///web.shop:8080), the
                               answer printed on stdout; GRPC_XDS_BOOTSTRAP names the
                               bootstrap file

Raw bytes in and out (identity serializers): no protobuf code generation needed.
"""

import sys
from concurrent import futures

import grpc

METHOD = "/mesh.interop.Echo/Say"


def serve(name):
    def say(request, context):
        return name.encode() + b":" + request

    handler = grpc.method_handlers_generic_handler(
        "mesh.interop.Echo",
        {"Say": grpc.unary_unary_rpc_method_handler(say)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    # Until the test stops it (SIGTERM).
    server.wait_for_termination()


def call(target):
    with grpc.insecure_channel(target) as channel:
        say = channel.unary_unary(METHOD)
        # wait_for_ready: the xDS resolver needs a few round trips (LDS, RDS, CDS, EDS).
        answer = say(b"hello", timeout=10, wait_for_ready=True)
        print(answer.decode(), flush=True)


if __name__ == "__main__":
    {"serve": serve, "call": call}[sys.argv[1]](sys.argv[2])
